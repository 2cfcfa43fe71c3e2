import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clirun import run_cli as run
from personaedit.preflight import parse_edit_option
from personaedit.edits import ActivationEdit, BaseModelInfo, Intervention
from personaedit.models import load_model
from test_loading import save_tiny


@pytest.fixture
def model_dir(tmp_path):
    return str(save_tiny(tmp_path / "tiny-model"))


def test_generate_json_one_line_per_prompt(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tea\n\nplans and lists\n")
    code, out, _ = run(["generate", "--model", model_dir, "--prompt", "hello", "--prompts-file", str(prompts),
                        "--json", "--max-new-tokens", "4"], capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [l["prompt"] for l in lines] == ["hello", "tea", "plans and lists"]
    assert all(isinstance(l["text"], str) for l in lines)


def test_generate_with_an_edit_and_strength(model_dir, tmp_path, capsys):
    lm = load_model(model_dir)
    edit = ActivationEdit(method="test", base=BaseModelInfo.of(lm),
                          interventions=(Intervention("residual", 1, torch.linspace(-3, 3, 32)),))
    edit.save(tmp_path / "edit")
    base = ["generate", "--model", model_dir, "--prompt", "hello", "--json", "--max-new-tokens", "6"]
    _, plain, _ = run(base, capsys)
    code, edited, _ = run(base + ["--edit", f"{tmp_path / 'edit'}:8"], capsys)
    _, zero, _ = run(base + ["--edit", f"{tmp_path / 'edit'}:0"], capsys)
    assert code == 0 and edited != plain and zero == plain


def test_info_shows_the_edit(model_dir, tmp_path, capsys):
    lm = load_model(model_dir)
    edit = ActivationEdit(method="dpnle", base=BaseModelInfo.of(lm), interventions=(
        Intervention("mlp_hidden", 1, torch.ones(2), torch.tensor([3, 9])),))
    edit.save(tmp_path / "edit")
    code, out, _ = run(["info", str(tmp_path / "edit")], capsys)
    assert code == 0 and "dpnle" in out and "3.12%" in out  # 2 of 64 neurons
    code, out, _ = run(["info", str(tmp_path / "edit"), "--json"], capsys)
    assert json.loads(out)["kind"] == "activation"


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "no such model folder"),
    (["generate", "--prompt", "hi", "--edit", "/no/edit"], "not an edit folder"),
    (["generate", "--model", "/no/such/dir"], "no prompts"),
    (["generate", "--prompts-file", "/no/file.txt"], "cannot read prompts file"),
    (["info", "/no/edit"], "not an edit folder"),
    (["demo", "--persona", "extroversion=high"], "did you mean 'extraversion'"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, capsys):
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_usage_errors_exit_2(capsys):
    code, _, _ = run(["generate", "--bogus"], capsys)
    assert code == 2


def test_installed_command_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "personaedit", "generate", "--model", "/no/such/dir",
                             "--prompt", "hi"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: no such model folder: /no/such/dir\n"


def test_parse_edit_option():
    assert parse_edit_option("out/e:0.5") == (Path("out/e"), 0.5)
    assert parse_edit_option("out/e") == (Path("out/e"), 1.0)
    assert parse_edit_option("out/e:-2")[1] == -2.0


def test_edit_command_fits_saves_and_is_usable(model_dir, tmp_path, capsys):
    out = tmp_path / "steer-edit"
    code, _, err = run(["edit", "steer", "--model", model_dir, "--persona", "extraversion=high", "--out", str(out),
                        "--pairs", "8", "--layer", "1"], capsys)
    assert code == 0 and "saved activation edit" in err
    code, info_out, _ = run(["info", str(out)], capsys)
    assert code == 0 and "steer" in info_out and "residual" in info_out
    code, again, _ = run(["edit", "steer", "--model", model_dir, "--persona", "extraversion=high", "--out", str(out)], capsys)
    assert code == 2  # an existing edit is only replaced with --force
    code, _, _ = run(["generate", "--model", model_dir, "--prompt", "hi", "--edit", f"{out}:2", "--json",
                      "--max-new-tokens", "3"], capsys)
    assert code == 0


@pytest.mark.parametrize("args, message", [
    (["edit", "steer", "--persona", "extroversion=high", "--out", "x"], "did you mean 'extraversion'"),
    (["edit", "dpnle", "--persona", "extraversion=high", "--out", "x", "--layers", "99", "--model"], None),
])
def test_edit_command_errors(args, message, model_dir, capsys):
    if args[-1] == "--model":
        args = args + [model_dir]
        message = "out of range"
    code, _, err = run(args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_judge_scores_jsonl_and_keeps_fields(tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "I love big parties and meeting strangers!", "id": 1}\n\n{"text": "I stay home alone."}\n')
    out = tmp_path / "scores.jsonl"
    code, _, _ = run(["judge", "--in", str(texts), "--out", str(out)], capsys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and len(rows) == 2 and rows[0]["id"] == 1
    assert set(rows[0]["scores"]) == {"openness", "conscientiousness", "extraversion", "agreeableness",
                                      "neuroticism", "ei", "sn", "tf", "jp"}
    assert all(-1 <= v <= 1 for row in rows for v in row["scores"].values())
    assert rows[0]["scores"]["extraversion"] > rows[1]["scores"]["extraversion"]


@pytest.mark.parametrize("content, message", [
    ("not json\n", "not a JSON line"),
    ('{"txt": "x"}\n', 'needs a "text" string'),
])
def test_judge_rejects_bad_input_and_writes_nothing(content, message, tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(content)
    code, _, err = run(["judge", "--in", str(texts), "--out", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and message in err and not (tmp_path / "o.jsonl").exists()


def test_eval_rejects_an_unknown_suite(capsys, tmp_path):
    code, _, err = run(["eval", "--suite", "huge", "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and "unknown suite" in err


def test_every_option_of_every_method_has_help():
    from personaedit.methods import get_method
    import importlib
    import pkgutil

    import personaedit.methods
    from personaedit.methods.registry import all_methods

    methods = all_methods()
    # Every method module (one with a `fit`) is listed in the static registry, under its module's name.
    modules = [m.name for m in pkgutil.iter_modules(personaedit.methods.__path__)]
    with_fit = {m for m in modules if callable(getattr(importlib.import_module(f"personaedit.methods.{m}"), "fit", None))}
    assert with_fit == set(methods) and all(methods[m].fit.__module__ == f"personaedit.methods.{m}" for m in methods)
    for name, chosen in methods.items():
        assert set(chosen.option_help()) == set(chosen.options()), name
        assert all(text.strip() for text in chosen.option_help().values()), name
    assert "quantile of the layer" in get_method("dpnle").option_help()["quantile"]
    assert "earlier queries' keys" in get_method("palette").option_help()["protect"]
    assert "own reply under the persona prompt" in get_method("mend").option_help()["text"]


def test_vector_train_flags_are_the_train_options(capsys):
    import dataclasses

    import typer

    from personaedit.cli import app
    from personaedit.vectors.options import TrainOptions

    train = typer.main.get_command(app).commands["vector"].commands["train"]
    flags = {opt for param in train.params for opt in param.opts}
    fields = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainOptions)} - {"--learning-rate"}
    assert fields | {"--lr", "--persona", "--out", "--model", "--device", "-p", "-o", "-m"} == flags
    code, _, err = run(["vector", "train", "--persona", "extraversion=high", "--out", "x", "--batch-size", "0"], capsys)
    assert code == 2 and "--batch-size" in err


@pytest.mark.parametrize("argv, shown", [(["--help"], ["edit", "export"]),
                                          (["edit", "steer", "--help"], ["--read-at", "--instruction-only"])])
def test_help_does_not_import_torch(argv, shown):
    """`personaedit --help` and a method's `edit METHOD --help` answer without loading torch (the method loads it
    when its command runs; its flags come from method_options.json)."""
    probe = ("import sys; from personaedit.cli import main\n"
             f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False False"
    assert all(word in result.stdout for word in shown)


def test_an_option_on_by_default_can_be_turned_off_from_the_command_line(model_dir, tmp_path, capsys):
    """palette's `protect` is on by default; the paper's plain sequential edits need --no-protect."""
    out = tmp_path / "palette-plain"
    code, _, err = run(["edit", "palette", "--model", model_dir, "--persona", "extraversion=high", "--out", str(out),
                        "--no-protect", "--queries", "1", "--steps", "1", "--prefixes", "0"], capsys)
    assert code == 0, err
    assert json.loads((out / "edit.json").read_text())["options"]["protect"] is False
    code, _, _ = run(["edit", "palette", "--model", model_dir, "--persona", "extraversion=high",
                      "--out", str(tmp_path / "palette-protected"), "--protect", "--queries", "1", "--steps", "1",
                      "--prefixes", "0"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "palette-protected" / "edit.json").read_text())["options"]["protect"] is True
