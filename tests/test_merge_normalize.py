"""TIES/DARE-TIES normalisation: by count (ours, the default), by the weight sum (mergekit's), or none."""

import json

import pytest
import torch

from clirun import run_cli
from personaedit.errors import PersonaEditError
from personaedit.merge import MergeConfig, VectorRef, load_config
from personaedit.merge.methods import MergeOptions, merge_deltas
from test_merge import make_vector, params_of, save_model


def ties(deltas, weights, normalize):
    return merge_deltas("ties", [torch.tensor(d) for d in deltas], weights, MergeOptions(density=1.0, normalize=normalize)).tolist()


def test_hand_computed_count_weight_sum_and_none():
    # weighted: [1.5, -0.5] and [2, 4]; elected signs (+, +); entry 0: both agree (3.5), entry 1: only the second (4)
    deltas, weights = [[3.0, -1.0], [1.0, 2.0]], [0.5, 2.0]
    assert ties(deltas, weights, "count") == pytest.approx([3.5 / 2, 4.0])
    assert ties(deltas, weights, True) == pytest.approx([3.5 / 2, 4.0])
    assert ties(deltas, weights, "weight-sum") == pytest.approx([3.5 / 2.5, 4.0 / 2.0])
    assert ties(deltas, weights, "none") == pytest.approx([3.5, 4.0]) == ties(deltas, weights, False)
    # one vector at weight -1: count keeps the negation, the weight sum (mergekit) undoes it
    assert ties([[1.0, -2.0]], [-1.0], "count") == [-1.0, 2.0]
    assert ties([[1.0, -2.0]], [-1.0], "weight-sum") == [1.0, -2.0]
    assert ties([[1.0, -2.0]], [0.5], "weight-sum") == [1.0, -2.0]  # and undoes scaling
    # agreeing vectors whose weights sum to zero: divided by 1, as mergekit does
    assert ties([[2.0], [-1.0]], [1.0, -1.0], "weight-sum") == [3.0]
    options = MergeOptions(drop=0.0, normalize="weight-sum")
    assert merge_deltas("dare_ties", [torch.tensor(d) for d in deltas], weights, options).tolist() == pytest.approx([1.4, 2.0])


def test_normalize_values_in_options_and_configs(tmp_path):
    assert MergeOptions(normalize="count") == MergeOptions(normalize=True)
    assert MergeOptions(normalize="none") == MergeOptions(normalize=False)
    with pytest.raises(PersonaEditError, match="unknown normalize 'mean'"):
        MergeOptions(normalize="mean")
    config = MergeConfig(method="ties", vectors=[VectorRef(path="v")], normalize="weight-sum")
    assert config.options().normalize == "weight-sum"
    with pytest.raises(PersonaEditError, match="does not use --normalize"):
        MergeConfig(method="task_arithmetic", vectors=[VectorRef(path="v")], normalize="weight-sum").options()
    (tmp_path / "m.yaml").write_text("method: dare_ties\nnormalize: weight-sum\nvectors:\n  - {path: v}\n")
    assert load_config(tmp_path / "m.yaml").options().normalize == "weight-sum"
    (tmp_path / "bad.yaml").write_text("method: ties\nnormalize: mean\nvectors:\n  - {path: v}\n")
    with pytest.raises(PersonaEditError, match="normalize.*unknown normalize 'mean'"):
        load_config(tmp_path / "bad.yaml")


def test_cli_normalize_weight_sum_on_a_model(tmp_path, capsys):
    base, model = save_model(tmp_path / "base")
    one = make_vector(tmp_path / "v1", model, seed=1)
    code, _, err = run_cli(["merge", "--base", str(base), "--vector", f"{tmp_path / 'v1'}=-1", "--method", "ties",
                            "--normalize", "weight-sum", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "personaedit-merge.json").read_text())
    assert record["options"] == {"density": 1.0, "normalize": "weight-sum"}
    name = "model.layers.1.mlp.down_proj.weight"
    expected = model.get_parameter(name) + one.deltas[name].dense  # the weight sum (-1) flips the negation back
    torch.testing.assert_close(params_of(tmp_path / "out")[name], expected, rtol=1e-6, atol=1e-7)
    code, _, err = run_cli(["merge", "--base", str(base), "--vector", str(tmp_path / "v1"), "--method", "ties",
                            "--normalize", "weight-sum", "--no-normalize", "--out", str(tmp_path / "out2")], capsys)
    assert code == 2 and "contradicts" in err
    code, _, err = run_cli(["merge", "--base", str(base), "--vector", str(tmp_path / "v1"), "--method", "ties",
                            "--normalize", "mean", "--out", str(tmp_path / "out3")], capsys)
    assert code == 2 and "unknown normalize 'mean'" in err and err.count("\n") == 1
