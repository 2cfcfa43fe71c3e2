"""Personality vector training on tiny models: LoRA and full fine-tuning, extraction, save/load, resume."""

import importlib
import json

import pytest
import torch

from personaedit.edits import WeightEdit, load_edit
from personaedit.errors import InputFileError, PersonaSpecError
from personaedit.vectors import train_vector
from personaedit.vectors import folder as folder_module
from personaedit.vectors import train as train_module
from personaedit.vectors.distill import Example, load_examples, reply_ended, save_examples
from personaedit.vectors.train import encode_example
from test_cli import run
from test_loading import save_tiny
from tiny import tiny_lm

IDS = torch.tensor([[5, 17, 33, 9, 60, 41, 7]])
SETTINGS = dict(epochs=2, batch_size=4, save_steps=2, learning_rate=1e-2)


def folder_with_examples(path, n=12):
    path.mkdir()
    save_examples(path / "examples.jsonl",
                  [Example(f"What do you think of parties, {i}?", f"I love parties and meeting people, {i}!") for i in range(n)])
    return path


def logits(lm):
    with torch.no_grad():
        return lm.model(input_ids=IDS).logits


@pytest.mark.parametrize("family,rank", [("llama", 4), ("gpt2", 4), ("qwen2", 2), ("llama", 0), ("gpt2", 0)])
def test_vector_at_alpha_one_reproduces_the_fine_tuned_model(family, rank, tmp_path):
    lm = tiny_lm(family)
    before = logits(lm)
    out = folder_with_examples(tmp_path / "vector")
    trained = train_vector(lm, "extraversion=high", out, lora_rank=rank, **SETTINGS)
    assert trained.steps == 6 and trained.examples == 12 and trained.resumed_from == 0
    assert torch.equal(logits(lm), before)  # the base model was never touched
    with torch.no_grad():
        tuned = trained.model(input_ids=IDS).logits
    assert (tuned - before).abs().max() > 1e-3
    saved = load_edit(out)
    assert isinstance(saved, WeightEdit) and saved.method == "vector" and saved.base.fingerprint == lm.fingerprint
    assert saved.options["mode"] == ("full" if rank == 0 else "lora") and saved.options["steps"] == 6
    assert all((d.rank == rank) if rank else d.dense is not None for d in saved.deltas.values())
    with saved.apply(lm, 1.0):
        assert torch.allclose(logits(lm), tuned, atol=1e-5)
    with saved.apply(lm, 0.5):
        half = logits(lm)
    assert not torch.allclose(half, tuned, atol=1e-4) and not torch.allclose(half, before, atol=1e-4)
    assert torch.equal(logits(lm), before)


def test_lora_factors_cover_every_linear_layer_in_the_parameters_own_layout(tmp_path):
    lm = tiny_lm("gpt2")  # Conv1D weights are [in, out]
    trained = train_vector(lm, "extraversion=high", folder_with_examples(tmp_path / "v"), lora_rank=2, **SETTINGS)
    params = dict(lm.model.named_parameters())
    assert len(trained.edit.deltas) == 4 * lm.arch.num_layers  # c_attn, c_proj, c_fc, mlp c_proj per block
    for name, delta in trained.edit.deltas.items():
        assert delta.shape == tuple(params[name].shape)


def test_interrupted_training_resumes_from_the_last_checkpoint(tmp_path):
    lm = tiny_lm("llama")
    reference = train_vector(lm, "extraversion=high", folder_with_examples(tmp_path / "whole"), lora_rank=4, **SETTINGS)

    class Stop(Exception):
        pass

    def stop_at_five(stage, done, total):
        if stage == "training" and done == 5:  # after checkpoint-4 was written
            raise Stop

    out = folder_with_examples(tmp_path / "interrupted")
    with pytest.raises(Stop):
        train_vector(lm, "extraversion=high", out, lora_rank=4, on_progress=stop_at_five, **SETTINGS)
    assert (out / "checkpoints" / "checkpoint-4").is_dir() and not (out / "edit.json").exists()
    seen = []
    resumed = train_vector(lm, "extraversion=high", out, lora_rank=4, on_progress=lambda *a: seen.append(a), **SETTINGS)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert seen[0] == ("training", 4, 6) and seen[-1] == ("training", 6, 6)
    for name, delta in reference.edit.deltas.items():
        assert torch.allclose(resumed.edit.deltas[name].materialise(torch.device("cpu")),
                              delta.materialise(torch.device("cpu")), atol=1e-5)


def test_a_folder_resumes_only_its_own_run(tmp_path):
    lm = tiny_lm("llama")
    out = folder_with_examples(tmp_path / "v", n=4)
    train_vector(lm, "extraversion=high", out, lora_rank=2, **SETTINGS)
    with pytest.raises(InputFileError, match="other settings.*lora_rank"):
        train_vector(lm, "extraversion=high", out, lora_rank=4, **SETTINGS)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputFileError, match="not a personality vector folder"):
        train_vector(lm, "extraversion=high", foreign, **SETTINGS)


def test_distilled_examples_are_generated_once_and_cached(tmp_path, monkeypatch):
    lm = tiny_lm("qwen2")
    out = tmp_path / "v"
    trained = train_vector(lm, "extraversion=high", out, limit=3, max_new_tokens=6, lora_rank=2, epochs=1, batch_size=4)
    cached = load_examples(out / "examples.jsonl")
    assert 0 < len(cached) <= 3 and trained.examples == len(cached)
    assert all(e.prompt and e.response for e in cached)

    def no_regeneration(*args, **kwargs):
        raise AssertionError("distilled again")

    monkeypatch.setattr(train_module, "distill", no_regeneration)
    train_vector(lm, "extraversion=high", out, limit=3, max_new_tokens=6, lora_rank=2, epochs=1, batch_size=4)


def test_big5_chat_rows_of_the_persona_pole_are_the_training_data(tmp_path):
    csv = tmp_path / "big5.csv"
    csv.write_text("trait,level,train_input,train_output\n"
                   "extraversion,high,How was your weekend?,Amazing! I went to two parties.\n"
                   "extraversion,low,How was your weekend?,Quiet. I read at home.\n"
                   "neuroticism,high,Any plans?,I worry they will go wrong.\n"
                   "extraversion,high,Tea or coffee?,Coffee with friends!\n")
    lm = tiny_lm("llama")
    out = tmp_path / "v"
    trained = train_vector(lm, "extraversion=high", out, big5_chat=csv, lora_rank=2, epochs=1, batch_size=2)
    assert [e.response for e in load_examples(out / "examples.jsonl")] == ["Amazing! I went to two parties.", "Coffee with friends!"]
    assert trained.edit.options["source"] == "big5-chat:big5.csv"
    with pytest.raises(PersonaSpecError, match="exactly one Big Five trait"):
        train_vector(lm, "extraversion=high,neuroticism=low", tmp_path / "w", big5_chat=csv)


def test_loss_is_on_the_reply_and_end_of_turn_only(lm):
    example = Example("Tea or coffee?", "Coffee with friends!")
    encoded = encode_example(lm.tokenizer, example, max_length=512)
    reply = lm.tokenizer(example.response, add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id]
    prompt_len = len(encoded["input_ids"]) - len(reply)
    assert encoded["labels"][:prompt_len] == [-100] * prompt_len and encoded["labels"][prompt_len:] == reply
    assert encoded["input_ids"][prompt_len:] == reply
    assert "Tea or coffee?" in lm.tokenizer.decode(encoded["input_ids"][:prompt_len])
    assert len(encode_example(lm.tokenizer, example, max_length=8)["labels"]) == 8
    cut = encode_example(lm.tokenizer, Example("Tea or coffee?", "Coffee with", ended=False), max_length=512)
    assert cut["labels"][-1] != lm.tokenizer.eos_token_id  # a reply cut at the limit does not end the turn


def test_distilled_replies_cut_at_the_token_limit_are_marked(lm):
    assert reply_ended(lm.tokenizer, "Coffee with friends!", max_new_tokens=64)
    assert not reply_ended(lm.tokenizer, "I love parties " * 40, max_new_tokens=64)


def test_cli_trains_a_vector_usable_as_a_weight_edit(tmp_path, capsys):
    model_dir = str(save_tiny(tmp_path / "tiny-model"))
    out = folder_with_examples(tmp_path / "vector", n=4)
    code, _, err = run(["vector", "train", "--model", model_dir, "--persona", "extraversion=high", "--out", str(out),
                        "--lora-rank", "2", "--epochs", "1", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert "saved personality vector" in err and json.loads((out / "edit.json").read_text())["method"] == "vector"
    code, out_text, err = run(["generate", "--model", model_dir, "--edit", f"{out}:1.5", "--prompt", "hello",
                               "--json", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    code, _, err = run(["vector", "train", "--model", model_dir, "--persona", "extraversion=high", "--out", str(out),
                        "--lora-rank", "4", "--epochs", "1", "--batch-size", "2"], capsys)
    assert code == 2 and "other settings" in err


def test_incomplete_checkpoints_are_skipped_and_removed(tmp_path):
    """A kill while the Trainer saves leaves a partial or empty checkpoint-N; the rerun resumes from the last whole one."""
    import shutil

    lm = tiny_lm("llama")
    reference = train_vector(lm, "extraversion=high", folder_with_examples(tmp_path / "whole"), lora_rank=4, **SETTINGS)

    class Stop(Exception):
        pass

    def stop_at_five(stage, done, total):
        if stage == "training" and done == 5:
            raise Stop

    out = folder_with_examples(tmp_path / "killed")
    with pytest.raises(Stop):
        train_vector(lm, "extraversion=high", out, lora_rank=4, on_progress=stop_at_five, **SETTINGS)
    checkpoints = out / "checkpoints"
    assert folder_module.checkpoint_complete(checkpoints / "checkpoint-4")
    (checkpoints / "checkpoint-6").mkdir()  # killed as the folder was made
    shutil.copytree(checkpoints / "checkpoint-4", checkpoints / "checkpoint-5")  # killed after the weights
    for name in ("optimizer.pt", "trainer_state.json", folder_module.CHECKPOINT_MARKER):
        (checkpoints / "checkpoint-5" / name).unlink()
    shutil.copytree(checkpoints / "checkpoint-4", checkpoints / "checkpoint-7")  # a file cut short after the marker
    weights = next((checkpoints / "checkpoint-7").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert not any(folder_module.checkpoint_complete(checkpoints / f"checkpoint-{n}") for n in (5, 6, 7))
    (out / ".staged-vector").mkdir()  # a vector being saved when the run was killed
    resumed = train_vector(lm, "extraversion=high", out, lora_rank=4, **SETTINGS)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert not any((checkpoints / f"checkpoint-{n}").exists() for n in (5, 7)) and not (out / ".staged-vector").exists()
    for name, delta in reference.edit.deltas.items():
        assert torch.allclose(resumed.edit.deltas[name].materialise(torch.device("cpu")),
                              delta.materialise(torch.device("cpu")), atol=1e-5)
    # a checkpoint from before the completion marker counts when its trainer state reads whole
    last = checkpoints / "checkpoint-6"
    (last / folder_module.CHECKPOINT_MARKER).unlink()
    assert folder_module.checkpoint_complete(last)
    (last / "trainer_state.json").write_text('{"global_st')
    assert not folder_module.checkpoint_complete(last)


def test_distillation_resumes_from_the_batches_already_made(tmp_path, monkeypatch):
    from personaedit.persona import Persona
    distill_module = importlib.import_module("personaedit.vectors.distill")

    lm = tiny_lm("qwen2")
    persona = Persona.parse("extraversion=high")
    settings = dict(questions=6, max_new_tokens=4, batch_size=2, seed=3)
    whole = distill_module.distill(lm, persona, **settings)
    partial = tmp_path / "examples.partial.jsonl"
    real_generate = distill_module.generate
    calls = []

    class Killed(Exception):
        pass

    def generate_then_die(*args, **kwargs):
        if len(calls) == 2:
            raise Killed
        calls.append(args[1])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(distill_module, "generate", generate_then_die)
    with pytest.raises(Killed):
        distill_module.distill(lm, persona, partial=partial, **settings)
    assert len(partial.read_text().splitlines()) == 1 + 2  # settings, then the two finished batches
    with partial.open("a") as handle:
        handle.write('{"round": 0, "start": 4, "questi')  # a line cut short
    calls.clear()
    monkeypatch.setattr(distill_module, "generate", lambda *a, **k: calls.append(a[1]) or real_generate(*a, **k))
    progress = []
    resumed = distill_module.distill(lm, persona, partial=partial, on_progress=lambda d, t: progress.append(d), **settings)
    assert resumed == whole and len(calls) == 1 and progress == [2, 4, 6]
    # another run's file (other settings) is not reused
    calls.clear()
    distill_module.distill(lm, persona, partial=partial, **{**settings, "max_new_tokens": 5})
    assert len(calls) == 3


def test_training_keeps_distilled_batches_until_the_examples_are_written(tmp_path, monkeypatch):
    lm = tiny_lm("qwen2")
    out = tmp_path / "v"

    class Killed(Exception):
        pass

    real_save = train_module.save_examples

    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(train_module, "save_examples", die)
    with pytest.raises(Killed):
        train_vector(lm, "extraversion=high", out, limit=3, max_new_tokens=4, lora_rank=2, epochs=1, batch_size=4)
    assert (out / "examples.partial.jsonl").is_file() and not (out / "examples.jsonl").exists()
    monkeypatch.setattr(train_module, "save_examples", real_save)
    distill_module = importlib.import_module("personaedit.vectors.distill")

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(distill_module, "generate", no_generation)  # every batch is in the partial file
    train_vector(lm, "extraversion=high", out, limit=3, max_new_tokens=4, lora_rank=2, epochs=1, batch_size=4)
    assert (out / "examples.jsonl").is_file() and not (out / "examples.partial.jsonl").exists()
    assert (out / "edit.json").is_file()


def test_cli_warns_when_the_vector_is_all_zeros(tmp_path, capsys):
    model_dir = str(save_tiny(tmp_path / "tiny-model"))
    out = folder_with_examples(tmp_path / "vector", n=2)
    code, _, err = run(["vector", "train", "--model", model_dir, "--persona", "extraversion=high", "--out", str(out),
                        "--lora-rank", "0", "--epochs", "1", "--batch-size", "2", "--lr", "0"], capsys)
    assert code == 0, err
    assert "warning: the vector is all zeros" in err
