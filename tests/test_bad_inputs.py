"""A sweep of bad inputs through the command line, as a new user would make them.

Every case must exit with status 2, print exactly one line on stderr (no traceback), name what was wrong,
finish quickly, and leave nothing behind at the output paths it was given.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clirun import run_cli
from personaedit.edits import ActivationEdit, BaseModelInfo, Delta, Intervention, WeightEdit
from personaedit.models import load_model
from test_loading import save_tiny

NOT_A_FOLDER = "/proc/personaedit-cannot-write-here"  # even root cannot create files in /proc


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a tiny model, good edits, and broken copies of each."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = save_tiny(root / "model")
    lm = load_model(str(model))
    base = BaseModelInfo.of(lm)
    steer = ActivationEdit(method="steer", base=base, interventions=(Intervention("residual", 1, torch.ones(32)),))
    steer.save(root / "steer")
    weight = WeightEdit(method="rome", base=base, deltas={
        "model.layers.1.mlp.down_proj.weight": Delta(u=torch.ones(32, 1), v=torch.ones(64, 1))})
    weight.save(root / "weight")
    WeightEdit(method="rome", base=base, deltas={"model.layers.1.mlp.nothing.weight": Delta(dense=torch.ones(2, 2))}
               ).save(root / "weight-unknown-param")
    (root / "file.txt").write_text("I am a file, not a folder.\n")
    (root / "texts.jsonl").write_text('{"text": "I love parties."}\n')
    (root / "prompts.txt").write_text("hello\n")
    return root


def broken_copy(ws: Path, name: str, source: str = "steer") -> Path:
    target = ws / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ws / source, target)
    return target


def edit_json(folder: Path) -> dict:
    return json.loads((folder / "edit.json").read_text())


def write_edit_json(folder: Path, data) -> None:
    (folder / "edit.json").write_text(json.dumps(data))


# --- makers of broken inputs: each returns the value to put in the command ------------------------------

def corrupt_tensors(ws, how):
    folder = broken_copy(ws, f"tensors-{how}")
    path = folder / "tensors.safetensors"
    data = path.read_bytes()
    if how == "zero-byte":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00\xffnot safetensors at all" * 10)
    elif how == "pickled":
        path.write_bytes(pickle.dumps({"0.values": [1.0] * 32}))
    elif how == "header-only":
        path.write_bytes(data[:12])
    return str(folder)


def tensors_with(ws, name, value):
    folder = broken_copy(ws, f"tensors-{name}")
    save_file({"0.values": torch.full((32,), value)}, str(folder / "tensors.safetensors"))
    return str(folder)


def tensors_missing_key(ws):
    folder = broken_copy(ws, "tensors-missing-key")
    save_file({"other": torch.ones(32)}, str(folder / "tensors.safetensors"))
    return str(folder)


def meta_changed(ws, name, change, source="steer"):
    folder = broken_copy(ws, f"meta-{name}", source)
    data = edit_json(folder)
    change(data)
    write_edit_json(folder, data)
    return str(folder)


def raw_edit_json(ws, name, text: bytes):
    folder = broken_copy(ws, f"raw-{name}")
    (folder / "edit.json").write_bytes(text)
    return str(folder)


def model_variant(ws, name, change):
    folder = ws / f"model-{name}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(ws / "model", folder)
    change(folder)
    return str(folder)


def _weights(folder):
    return folder / "model.safetensors"


def _drop_a_weight(folder):
    from safetensors.torch import load_file

    tensors = load_file(str(_weights(folder)))
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, str(_weights(folder)), metadata={"format": "pt"})


def _extra_weight(folder):
    from safetensors.torch import load_file

    tensors = load_file(str(_weights(folder)))
    tensors["model.layers.9.mlp.extra.weight"] = torch.ones(2, 2)
    save_file(tensors, str(_weights(folder)), metadata={"format": "pt"})


def _legacy_bin_with_wrong_keys(folder):
    _weights(folder).unlink()
    torch.save({"some.other.weight": torch.ones(2, 2)}, folder / "pytorch_model.bin")


def _config(folder, change):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def M(ws, name, change):  # noqa: N802 - short name for the table below
    return model_variant(ws, name, change)


GEN = ["generate", "--prompt", "hi", "--max-new-tokens", "2", "--model", "{model}"]

# (id, args builder(ws) -> args, expected text in the message, output paths (relative to ws) that must not appear)
CASES = [
    # --- edits passed with --edit -------------------------------------------------------------------------
    ("edit-missing", lambda w: GEN + ["--edit", str(w / "nope")], "not an edit folder"),
    ("edit-is-file", lambda w: GEN + ["--edit", str(w / "file.txt")], "not an edit folder"),
    ("edit-no-json", lambda w: GEN + ["--edit", str(w / "model")], "not an edit folder"),
    ("edit-json-invalid", lambda w: GEN + ["--edit", raw_edit_json(w, "invalid", b"{not json")], "not valid JSON"),
    ("edit-json-binary", lambda w: GEN + ["--edit", raw_edit_json(w, "binary", b"\xff\xfe\x00garbage")], "edit.json"),
    ("edit-json-list", lambda w: GEN + ["--edit", raw_edit_json(w, "list", b"[1, 2, 3]")], "not a personaedit edit"),
    ("edit-json-empty", lambda w: GEN + ["--edit", raw_edit_json(w, "empty", b"")], "edit.json"),
    ("edit-format-wrong", lambda w: GEN + ["--edit", meta_changed(w, "format", lambda d: d.update(format="x"))],
     "not a personaedit edit"),
    ("edit-version-text", lambda w: GEN + ["--edit", meta_changed(w, "vtext", lambda d: d.update(format_version="abc"))],
     "format_version"),
    ("edit-version-list", lambda w: GEN + ["--edit", meta_changed(w, "vlist", lambda d: d.update(format_version=[1]))],
     "format_version"),
    ("edit-version-newer", lambda w: GEN + ["--edit", meta_changed(w, "vnew", lambda d: d.update(format_version=99))],
     "newer personaedit"),
    ("edit-kind-unknown", lambda w: GEN + ["--edit", meta_changed(w, "kind", lambda d: d.update(kind="magic"))],
     "unknown edit kind"),
    ("edit-kind-missing", lambda w: GEN + ["--edit", meta_changed(w, "nokind", lambda d: d.pop("kind"))],
     "unknown edit kind"),
    ("edit-method-missing", lambda w: GEN + ["--edit", meta_changed(w, "nomethod", lambda d: d.pop("method"))],
     "malformed"),
    ("edit-payload-missing", lambda w: GEN + ["--edit", meta_changed(w, "nopayload", lambda d: d.pop("payload"))],
     "malformed"),
    ("edit-payload-list", lambda w: GEN + ["--edit", meta_changed(w, "payloadlist", lambda d: d.update(payload=[]))],
     "malformed"),
    ("edit-op-unknown", lambda w: GEN + ["--edit", meta_changed(
        w, "op", lambda d: d["payload"]["interventions"][0].update(op="explode"))], "unknown intervention op"),
    ("edit-positions-unknown", lambda w: GEN + ["--edit", meta_changed(
        w, "pos", lambda d: d["payload"]["interventions"][0].update(positions="some"))], "unknown positions"),
    ("edit-site-unknown", lambda w: GEN + ["--edit", meta_changed(
        w, "site", lambda d: d["payload"]["interventions"][0].update(point="nowhere"))], "nowhere"),
    ("edit-layer-text", lambda w: GEN + ["--edit", meta_changed(
        w, "layertext", lambda d: d["payload"]["interventions"][0].update(layer="one"))], "malformed"),
    ("edit-layer-out-of-range", lambda w: GEN + ["--edit", meta_changed(
        w, "layer99", lambda d: d["payload"]["interventions"][0].update(layer=99))], "layer"),
    ("edit-persona-bad", lambda w: GEN + ["--edit", meta_changed(w, "persona", lambda d: d.update(persona={"charm": 1}))],
     "charm"),
    ("edit-persona-text", lambda w: GEN + ["--edit", meta_changed(w, "personatext", lambda d: d.update(persona="x"))],
     "malformed"),
    ("edit-base-fields", lambda w: GEN + ["--edit", meta_changed(w, "base", lambda d: d.update(base_model={"x": 1}))],
     "malformed"),
    ("edit-scale-text", lambda w: GEN + ["--edit", meta_changed(w, "scale", lambda d: d.update(scale="big"))],
     "malformed"),
    ("edit-scale-nan", lambda w: GEN + ["--edit", raw_edit_json(
        w, "scalenan", json.dumps({**edit_json(w / "steer"), "scale": float("nan")}).encode())], "scale"),
    ("edit-fingerprint", lambda w: GEN + ["--edit", meta_changed(
        w, "fp", lambda d: d["base_model"].update(fingerprint="0000"))], "pass force=True (--force)"),
    ("tensors-zero-byte", lambda w: GEN + ["--edit", corrupt_tensors(w, "zero-byte")], "tensors.safetensors"),
    ("tensors-truncated", lambda w: GEN + ["--edit", corrupt_tensors(w, "truncated")], "tensors.safetensors"),
    ("tensors-garbage", lambda w: GEN + ["--edit", corrupt_tensors(w, "garbage")], "tensors.safetensors"),
    ("tensors-pickled", lambda w: GEN + ["--edit", corrupt_tensors(w, "pickled")], "tensors.safetensors"),
    ("tensors-header-only", lambda w: GEN + ["--edit", corrupt_tensors(w, "header-only")], "tensors.safetensors"),
    ("tensors-nan", lambda w: GEN + ["--edit", tensors_with(w, "nan", float("nan"))], "not finite"),
    ("tensors-inf", lambda w: GEN + ["--edit", tensors_with(w, "inf", float("inf"))], "not finite"),
    ("tensors-missing-key", lambda w: GEN + ["--edit", tensors_missing_key(w)], "malformed"),
    ("tensors-file-missing", lambda w: GEN + ["--edit", _without_tensors(w)], "tensors.safetensors"),
    ("tensors-wrong-width", lambda w: GEN + ["--edit", tensors_with_shape(w, (7,))], "shape"),
    ("weight-param-unknown", lambda w: GEN + ["--edit", str(w / "weight-unknown-param")], "no parameter"),
    ("weight-payload-renamed", lambda w: GEN + ["--edit", meta_changed(w, "param", _rename_param, "weight")],
     "malformed"),
    ("weight-rank-text", lambda w: GEN + ["--edit", meta_changed(w, "rank", _rank_text, "weight")], "malformed"),
    ("composed-part-missing", lambda w: GEN + ["--edit", _composed_without_part(w)], "not an edit folder"),
    ("strength-nan", lambda w: GEN + ["--edit", f"{w / 'steer'}:nan"], "finite"),
    ("strength-inf", lambda w: GEN + ["--edit", f"{w / 'steer'}:inf"], "finite"),
    ("strength-overflow", lambda w: GEN + ["--edit", f"{w / 'steer'}:1e309"], "finite"),
    ("strength-text", lambda w: GEN + ["--edit", f"{w / 'steer'}:strong"], "DIR:STRENGTH"),
    ("strength-empty", lambda w: GEN + ["--edit", f"{w / 'steer'}:"], "DIR:STRENGTH"),
    # --- models --------------------------------------------------------------------------------------------
    ("model-missing", lambda w: ["generate", "-p", "hi", "--model", str(w / "nope")], "no such model folder"),
    ("model-empty-folder", lambda w: ["generate", "-p", "hi", "--model", _empty_folder(w)], "no config.json"),
    ("model-is-file", lambda w: ["generate", "-p", "hi", "--model", str(w / "file.txt")], "neither a model folder"),
    ("model-gguf-missing", lambda w: ["generate", "-p", "hi", "--model", str(w / "x.gguf")], "no such GGUF file"),
    ("model-gguf-garbage", lambda w: ["generate", "-p", "hi", "--model", _garbage_gguf(w, b"GGUFnot really")],
     "cannot read GGUF file"),
    ("model-gguf-empty", lambda w: ["generate", "-p", "hi", "--model", _garbage_gguf(w, b"")], "cannot read GGUF file"),
    ("model-hub-not-cached", lambda w: ["generate", "-p", "hi", "--model", "someone/not-cached"], "local Hugging Face cache"),
    ("model-config-invalid", lambda w: ["generate", "-p", "hi", "--model", M(
        w, "cfg", lambda f: (f / "config.json").write_text("{oops"))], "cannot load model"),
    ("model-config-no-type", lambda w: ["generate", "-p", "hi", "--model", M(
        w, "notype", lambda f: _config(f, lambda d: d.pop("model_type")))], "cannot load model"),
    ("model-config-unknown-type", lambda w: ["generate", "-p", "hi", "--model", M(
        w, "badtype", lambda f: _config(f, lambda d: d.update(model_type="fancy_llm")))], "cannot load model"),
    ("model-no-weights", lambda w: ["generate", "-p", "hi", "--model", M(w, "noweights", lambda f: _weights(f).unlink())],
     "cannot load model"),
    ("model-weights-zero-byte", lambda w: ["generate", "-p", "hi", "--model", M(
        w, "zero", lambda f: _weights(f).write_bytes(b""))], "cannot load model"),
    ("model-weights-truncated", lambda w: ["generate", "-p", "hi", "--model", M(
        w, "trunc", lambda f: _weights(f).write_bytes(_weights(f).read_bytes()[:5000]))], "cannot load model"),
    ("model-weights-garbage", lambda w: ["generate", "-p", "hi", "--model", M(
        w, "garbage", lambda f: _weights(f).write_bytes(b"\x01\x02garbage" * 100))], "cannot load model"),
    ("model-weights-missing-tensor", lambda w: ["generate", "-p", "hi", "--model", M(w, "missing", _drop_a_weight)],
     "missing"),
    ("model-weights-unexpected-tensor", lambda w: ["generate", "-p", "hi", "--model", M(w, "extra", _extra_weight)],
     "unexpected"),
    ("model-legacy-bin-wrong-keys", lambda w: ["generate", "-p", "hi", "--model", M(w, "bin", _legacy_bin_with_wrong_keys)],
     "missing"),
    ("model-legacy-bin-pickled-code", lambda w: ["generate", "-p", "hi", "--model", M(w, "evilbin", _evil_bin)],
     "cannot load model"),
    ("model-no-tokenizer", lambda w: ["generate", "-p", "hi", "--model", M(w, "notok", _drop_tokenizer)],
     "cannot load model"),
    ("device-tpu", lambda w: GEN + ["--model", str(w / "model"), "--device", "tpu"], "unknown device"),
    ("device-cuda-absent", lambda w: GEN + ["--model", str(w / "model"), "--device", "cuda"], "no CUDA device"),
    ("device-cuda-index", lambda w: GEN + ["--model", str(w / "model"), "--device", "cuda:x"], "unknown device"),
    ("device-mps-absent", lambda w: GEN + ["--model", str(w / "model"), "--device", "mps"], "no MPS device"),
    ("dtype-unknown", lambda w: GEN + ["--model", str(w / "model"), "--dtype", "float8"], "unknown dtype"),
    # --- generate options -------------------------------------------------------------------------------------
    ("sample-temperature-zero", lambda w: GEN + ["--sample", "--temperature", "0"], "--temperature"),
    ("max-new-tokens-huge", lambda w: ["generate", "-p", "hi", "--model", str(w / "model"), "--max-new-tokens",
                                       str(10**12)], "context"),
    ("max-new-tokens-zero", lambda w: ["generate", "-p", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("max-new-tokens-text", lambda w: ["generate", "-p", "hi", "--max-new-tokens", "many"], "--max-new-tokens"),
    ("batch-size-zero", lambda w: GEN + ["--batch-size", "0"], "--batch-size"),
    ("temperature-negative", lambda w: GEN + ["--temperature", "-1"], "--temperature"),
    ("seed-text", lambda w: GEN + ["--seed", "abc"], "--seed"),
    ("prompts-file-missing", lambda w: ["generate", "--prompts-file", str(w / "nope.txt")], "cannot read prompts file"),
    ("prompts-file-folder", lambda w: ["generate", "--prompts-file", str(w / "model")], "cannot read prompts file"),
    ("prompts-file-binary", lambda w: ["generate", "--prompts-file", _binary_file(w)], "cannot read prompts file"),
    ("prompts-file-empty", lambda w: ["generate", "--prompts-file", _empty_file(w)], "no prompts"),
    ("no-prompts", lambda w: ["generate"], "no prompts"),
    ("unknown-option", lambda w: ["generate", "--bogus"], "No such option"),
    ("unknown-command", lambda w: ["frobnicate"], "No such command"),
    ("option-needs-value", lambda w: ["generate", "--model"], "requires an argument"),
    # --- personas ---------------------------------------------------------------------------------------------
    ("persona-unknown-trait", lambda w: ["edit", "steer", "--persona", "charm=high", "--out", str(w / "o1")], "charm"),
    ("persona-typo", lambda w: ["edit", "steer", "--persona", "extroversion=high", "--out", str(w / "o2")],
     "did you mean 'extraversion'"),
    ("persona-level-range", lambda w: ["edit", "steer", "--persona", "extraversion=2", "--out", str(w / "o3")], "[-1, 1]"),
    ("persona-level-nan", lambda w: ["edit", "steer", "--persona", "extraversion=nan", "--out", str(w / "o4")],
     "extraversion"),
    ("persona-empty", lambda w: ["edit", "steer", "--persona", "", "--out", str(w / "o5")], "persona"),
    ("persona-no-level", lambda w: ["edit", "steer", "--persona", "extraversion", "--out", str(w / "o6")], "extraversion"),
    ("persona-mbti-bad-pole", lambda w: ["edit", "steer", "--persona", "tf=X", "--out", str(w / "o7")], "tf"),
    ("persona-duplicate", lambda w: ["edit", "steer", "--persona", "extraversion=high,extraversion=low",
                                     "--out", str(w / "o8")], "extraversion"),
    # --- edit METHOD --------------------------------------------------------------------------------------------
    ("edit-unknown-method", lambda w: ["edit", "telepathy", "--persona", "extraversion=high", "--out", str(w / "o9")],
     "No such command"),
    ("edit-out-under-file", lambda w: ["edit", "steer", "--model", str(w / "model"), "--persona", "extraversion=high",
                                       "--out", str(w / "file.txt" / "edit")], "file.txt"),
    ("edit-out-unwritable", lambda w: ["edit", "steer", "--model", str(w / "model"), "--persona", "extraversion=high",
                                       "--out", NOT_A_FOLDER + "/edit"], "cannot write"),
    ("edit-out-is-file", lambda w: ["edit", "steer", "--model", str(w / "model"), "--persona", "extraversion=high",
                                    "--out", str(w / "file.txt")], "file.txt"),
    ("edit-out-foreign-folder", lambda w: ["edit", "steer", "--model", str(w / "model"), "--persona", "extraversion=high",
                                           "--out", str(w / "model")], "not an edit folder"),
    ("edit-out-exists", lambda w: ["edit", "steer", "--model", str(w / "model"), "--persona", "extraversion=high",
                                   "--out", str(w / "steer")], "--force"),
    ("edit-layers-out-of-range", lambda w: ["edit", "dpnle", "--model", str(w / "model"), "--persona", "extraversion=high",
                                            "--out", str(w / "o10"), "--layers", "99"], "out of range"),
    ("edit-device-tpu", lambda w: ["edit", "steer", "--device", "tpu", "--persona", "extraversion=high",
                                   "--out", str(w / "o11")], "unknown device"),
    ("edit-model-missing", lambda w: ["edit", "steer", "--model", str(w / "nope"), "--persona", "extraversion=high",
                                      "--out", str(w / "o12")], "no such model folder"),
    # --- judge --------------------------------------------------------------------------------------------------
    ("judge-in-missing", lambda w: ["judge", "--in", str(w / "nope.jsonl"), "--out", str(w / "j1.jsonl")], "cannot read"),
    ("judge-in-folder", lambda w: ["judge", "--in", str(w / "model"), "--out", str(w / "j2.jsonl")], "cannot read"),
    ("judge-in-not-json", lambda w: ["judge", "--in", _file(w, "nj.jsonl", "hello\n"), "--out", str(w / "j3.jsonl")],
     "not a JSON line"),
    ("judge-in-no-text", lambda w: ["judge", "--in", _file(w, "nt.jsonl", '{"t": 1}\n'), "--out", str(w / "j4.jsonl")],
     '"text"'),
    ("judge-in-text-number", lambda w: ["judge", "--in", _file(w, "tn.jsonl", '{"text": 5}\n'), "--out",
                                        str(w / "j5.jsonl")], '"text"'),
    ("judge-out-under-file", lambda w: ["judge", "--in", str(w / "texts.jsonl"), "--out", str(w / "file.txt" / "s.jsonl")],
     "file.txt"),
    ("judge-out-unwritable", lambda w: ["judge", "--in", str(w / "texts.jsonl"), "--out", NOT_A_FOLDER + "/s.jsonl"],
     "cannot write"),
    ("judge-out-is-folder", lambda w: ["judge", "--in", str(w / "texts.jsonl"), "--out", str(w / "model")], "folder"),
    ("judge-no-args", lambda w: ["judge"], "--in"),
    ("judge-head-missing", lambda w: ["judge", "--in", str(w / "texts.jsonl"), "--out", str(w / "j6.jsonl"),
                                      "--head", str(w / "nope.safetensors")], "head"),
    ("judge-head-garbage", lambda w: ["judge", "--in", str(w / "texts.jsonl"), "--out", str(w / "j7.jsonl"),
                                      "--head", _file(w, "head.safetensors", "garbage")], "head"),
    ("judge-head-zero-byte", lambda w: ["judge", "--in", str(w / "texts.jsonl"), "--out", str(w / "j8.jsonl"),
                                        "--head", _file(w, "zero.safetensors", "")], "head"),
    ("judge-train-encoder", lambda w: ["judge", "train", "--out", str(w / "h.safetensors"), "--encoder", "bert9"],
     "bert9"),
    ("judge-evaluate-split", lambda w: ["judge", "evaluate", "--split", "holdout"], "holdout"),
    # --- eval -----------------------------------------------------------------------------------------------------
    ("eval-suite", lambda w: ["eval", "--suite", "huge", "--out", str(w / "r1.json")], "unknown suite"),
    ("eval-out-under-file", lambda w: ["eval", "--out", str(w / "file.txt" / "r.json")], "file.txt"),
    ("eval-out-unwritable", lambda w: ["eval", "--out", NOT_A_FOLDER + "/r.json"], "cannot write"),
    ("eval-html-under-file", lambda w: ["eval", "--out", str(w / "r2.json"), "--html", str(w / "file.txt" / "r.html")],
     "file.txt"),
    ("eval-edit-missing", lambda w: ["eval", "--out", str(w / "r3.json"), "--edit", str(w / "nope")], "not an edit folder"),
    ("eval-edit-nan", lambda w: ["eval", "--out", str(w / "r4.json"), "--edit", f"{w / 'steer'}:nan"], "finite"),
    ("eval-device", lambda w: ["eval", "--out", str(w / "r5.json"), "--device", "tpu"], "unknown device"),
    # --- bench ------------------------------------------------------------------------------------------------------
    ("bench-method", lambda w: ["bench", "--methods", "telepathy", "--out", str(w / "b1")], "telepathy"),
    ("bench-strengths-text", lambda w: ["bench", "--methods", "steer", "--strengths", "a,b", "--out", str(w / "b2")],
     "strength"),
    ("bench-strengths-nan", lambda w: ["bench", "--methods", "steer", "--strengths", "nan", "--out", str(w / "b3")],
     "strength"),
    ("bench-persona", lambda w: ["bench", "--methods", "steer", "--personas", "charm=high", "--out", str(w / "b4")],
     "charm"),
    ("bench-backend", lambda w: ["bench", "--methods", "steer", "--backend", "slurm", "--out", str(w / "b5")], "slurm"),
    ("bench-set-format", lambda w: ["bench", "--methods", "steer", "--set", "layer5", "--out", str(w / "b6")], "--set"),
    ("bench-set-unknown", lambda w: ["bench", "--methods", "steer", "--set", "steer.nothing=1", "--out", str(w / "b7")],
     "nothing"),
    ("bench-suite", lambda w: ["bench", "--methods", "steer", "--suite", "huge", "--out", str(w / "b8")], "huge"),
    ("bench-out-under-file", lambda w: ["bench", "--methods", "steer", "--out", str(w / "file.txt" / "b")], "file.txt"),
    ("bench-out-unwritable", lambda w: ["bench", "--methods", "steer", "--out", NOT_A_FOLDER + "/b"], "cannot write"),
    ("bench-device", lambda w: ["bench", "--methods", "steer", "--device", "tpu", "--out", str(w / "b9")], "unknown device"),
    # --- merge / vectors --------------------------------------------------------------------------------------------
    ("merge-no-vectors", lambda w: ["merge", "--out", str(w / "m1")], "--vector"),
    ("merge-vector-missing", lambda w: ["merge", "--base", str(w / "model"), "--vector", f"{w / 'nope'}=1",
                                        "--out", str(w / "m2")], "nope"),
    ("merge-vector-alpha-text", lambda w: ["merge", "--vector", f"{w / 'weight'}=abc", "--out", str(w / "m3")],
     "must be a number"),
    ("merge-vector-alpha-nan", lambda w: ["merge", "--vector", f"{w / 'weight'}=nan", "--out", str(w / "m4")], "finite"),
    ("merge-method", lambda w: ["merge", "--vector", str(w / "weight"), "--method", "average", "--out", str(w / "m5")],
     "average"),
    ("merge-density", lambda w: ["merge", "--vector", str(w / "weight"), "--method", "ties", "--density", "1.5",
                                 "--out", str(w / "m6")], "density"),
    ("merge-config-missing", lambda w: ["merge", "--config", str(w / "nope.yaml"), "--out", str(w / "m7")], "nope.yaml"),
    ("merge-config-invalid", lambda w: ["merge", "--config", _file(w, "bad.yaml", "a: [1, 2\n"), "--out", str(w / "m8")],
     "bad.yaml"),
    ("merge-config-unknown-key", lambda w: ["merge", "--config", _file(
        w, "key.yaml", f"base: {w / 'model'}\nvectors: [{{path: {w / 'weight'}}}]\nsharpness: 3\n"),
        "--out", str(w / "m9")], "sharpness"),
    ("merge-out-under-file", lambda w: ["merge", "--base", str(w / "model"), "--vector", str(w / "weight"),
                                        "--out", str(w / "file.txt" / "m")], "file.txt"),
    ("merge-out-unwritable", lambda w: ["merge", "--base", str(w / "model"), "--vector", str(w / "weight"),
                                        "--out", NOT_A_FOLDER + "/m"], "cannot write"),
    ("merge-base-missing", lambda w: ["merge", "--base", str(w / "nope"), "--vector", str(w / "weight"),
                                      "--out", str(w / "m10")], "nope"),
    ("merge-steer-edit", lambda w: ["merge", "--base", str(w / "model"), "--vector", str(w / "steer"),
                                    "--out", str(w / "m11")], "activation edit"),
    ("vector-info-steer", lambda w: ["vector", "info", str(w / "steer")], "activation edit"),
    ("vector-info-missing", lambda w: ["vector", "info", str(w / "nope")], "nope"),
    ("vector-train-persona", lambda w: ["vector", "train", "--persona", "charm=high", "--out", str(w / "v1")], "charm"),
    ("vector-train-out-under-file", lambda w: ["vector", "train", "--persona", "extraversion=high",
                                               "--out", str(w / "file.txt" / "v")], "file.txt"),
    ("vector-train-big5-missing", lambda w: ["vector", "train", "--persona", "extraversion=high", "--out", str(w / "v2"),
                                             "--big5-chat", str(w / "nope.csv")], "nope.csv"),
    ("vector-train-device", lambda w: ["vector", "train", "--persona", "extraversion=high", "--out", str(w / "v3"),
                                       "--device", "tpu"], "unknown device"),
    # --- info / demo / mend ----------------------------------------------------------------------------------------
    ("info-missing", lambda w: ["info", str(w / "nope")], "not an edit folder"),
    ("info-corrupt", lambda w: ["info", corrupt_tensors(w, "garbage")], "tensors.safetensors"),
    ("demo-persona", lambda w: ["demo", "--persona", "charm=high"], "charm"),
    ("demo-methods", lambda w: ["demo", "--methods", "telepathy"], "telepathy"),
    ("demo-html-under-file", lambda w: ["demo", "--html", str(w / "file.txt" / "d.html")], "file.txt"),
    ("demo-questions", lambda w: ["demo", "--questions", "0"], "--questions"),
    ("mend-train-data", lambda w: ["mend", "train", "--model", str(w / "model"), "--data", str(w / "nope.jsonl")],
     "nope.jsonl"),
    ("mend-train-out-under-file", lambda w: ["mend", "train", "--model", str(w / "model"),
                                             "--out", str(w / "file.txt" / "e")], "file.txt"),
    ("calibrate-method", lambda w: ["calibrate", "rome", "--persona", "extraversion=high"], "steer, npti, dpnle"),
    ("calibrate-persona", lambda w: ["calibrate", "steer", "--persona", "extraversion=loud"], "loud"),
    ("calibrate-budget-nan", lambda w: ["calibrate", "steer", "-p", "extraversion=high", "--perplexity-budget", "nan"],
     "--perplexity-budget"),
    ("calibrate-coherent", lambda w: ["calibrate", "steer", "-p", "extraversion=high", "--coherent-min", "2"],
     "--coherent-min"),
    ("calibrate-out-under-file", lambda w: ["calibrate", "steer", "-p", "extraversion=high", "--model", str(w / "model"),
                                            "--out", str(w / "file.txt" / "e")], "file.txt"),
]


def _without_tensors(ws):
    folder = broken_copy(ws, "no-tensors")
    (folder / "tensors.safetensors").unlink()
    return str(folder)


def tensors_with_shape(ws, shape):
    folder = broken_copy(ws, "tensors-shape")
    save_file({"0.values": torch.ones(shape)}, str(folder / "tensors.safetensors"))
    return str(folder)


def _rename_param(data):
    deltas = data["payload"]["deltas"]
    deltas["model.layers.1.mlp.nothing.weight"] = deltas.pop(next(iter(deltas)))


def _rank_text(data):
    next(iter(data["payload"]["deltas"].values()))["rank"] = None  # says dense, but factors are stored


def _composed_without_part(ws):
    folder = ws / "composed-broken"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    meta = {"format": "personaedit-edit", "format_version": 1, "kind": "composed", "method": "steer+steer",
            "payload": {"parts": [{"dir": "part-0", "weight": 1.0}]}}
    (folder / "edit.json").write_text(json.dumps(meta))
    return str(folder)


def _empty_folder(ws):
    folder = ws / "empty-folder"
    folder.mkdir(exist_ok=True)
    return str(folder)


def _garbage_gguf(ws, content):
    path = ws / f"garbage-{len(content)}.gguf"
    path.write_bytes(content)
    return str(path)


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _evil_bin(folder):
    _weights(folder).unlink()
    torch.save({"x": _Evil()}, folder / "pytorch_model.bin")


def _drop_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def _binary_file(ws):
    path = ws / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00\x01binary")
    return str(path)


def _empty_file(ws):
    path = ws / "empty.txt"
    path.write_text("\n\n")
    return str(path)


def _file(ws, name, text):
    path = ws / name
    path.write_text(text)
    return str(path)


def _out_paths(args):
    """The output paths a command was given (they must not exist after a failure)."""
    found = []
    for flag in ("--out", "-o", "--html"):
        if flag in args:
            found.append(Path(args[args.index(flag) + 1]))
    return found


def test_the_sweep_has_over_a_hundred_cases():
    assert len(CASES) >= 100
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name, build, message", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(name, build, message, ws, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(ws / "hub-cache"))
    args = [str(ws / "model") if a == "{model}" else a for a in build(ws)]
    if "--model" in args and args.count("--model") > 1:  # a case that names its own model wins
        first = args.index("--model")
        del args[first:first + 2]
    outs = [p for p in _out_paths(args) if not p.exists()]
    before = sorted(p.name for p in ws.iterdir())
    started = time.perf_counter()
    code, out, err = run_cli(args, capsys)
    seconds = time.perf_counter() - started
    assert code == 2 and out == "", (name, code, out[-500:], err[-2000:])
    assert err.startswith("error: ") and err.count("\n") == 1, (name, err[-2000:])
    assert "Traceback" not in err and message in err, (name, err)
    assert seconds < 20, (name, seconds)
    for path in outs:
        assert not path.exists(), (name, path)
    leftovers = [p for p in sorted(p.name for p in ws.iterdir()) if p not in before and p.startswith(".")]
    assert not leftovers, (name, leftovers)
