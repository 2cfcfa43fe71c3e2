"""The side-by-side benchmarks' own logic (benchmarks/peers/, benchmarks/run.py): ratio rows and their verdicts, the
stored outputs that `run.py --peers --stored` prints, the DARE expectation check of mergekit_vs against samplers
that are right and wrong, and repeng_vs's choice of the best strength within a coherence budget. No peer is
installed or run here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS / "peers"))
sys.path.insert(1, str(BENCHMARKS))

import mergekit_vs  # noqa: E402
import peerlib  # noqa: E402
import repeng_vs  # noqa: E402


def test_ratio_row_reads_the_verdict_from_the_median():
    row = peerlib.ratio_row("merge: wall ours/peer", [0.4, 0.6, 0.45], 0.5)
    assert "0.45x [0.40, 0.60]" in row and row.endswith("met") and "NOT" not in row
    assert peerlib.ratio_row("merge: wall ours/peer", [0.4, 0.6, 0.55], 0.5).endswith("NOT MET")
    assert peerlib.ratio_row("tok/s edited/unedited", [0.96, 0.97], 0.95, higher_is_better=True).endswith(" met")
    assert peerlib.ratio_row("tok/s edited/unedited", [0.90, 0.97, 0.93], 0.95, higher_is_better=True).endswith("NOT MET")


def test_recorded_output_is_what_run_py_prints_back(tmp_path, monkeypatch, capsys):
    import run

    monkeypatch.setattr(peerlib, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "HERE", tmp_path)  # paths are printed relative to HERE's parent
    with peerlib.recorded("mergekit_vs-ties"):
        print("some context line")
        print(peerlib.ratio_row("ties: wall ours/peer", [0.4], 0.5))
    assert "ties: wall" in capsys.readouterr().out  # printed as it ran, too
    with pytest.raises(RuntimeError):  # a run that fails leaves no stored output
        with peerlib.recorded("repeng_vs"):
            print(peerlib.ratio_row("fit: wall ours/peer", [0.1]))
            raise RuntimeError("stopped")
    assert [f.name for f in tmp_path.iterdir()] == ["mergekit_vs-ties.txt"]
    stored = run.stored_rows(None).splitlines()
    assert stored[1].startswith("# command: python ") and "load average" in stored[2]
    assert stored[3].startswith("ties: wall ours/peer") and "some context line" not in stored
    assert run.stored_rows(["mergekit_vs"]) == run.stored_rows(None)
    with pytest.raises(SystemExit):
        run.stored_rows(["repeng_vs"])


def _dare_folder(folder: Path, tensor: torch.Tensor) -> str:
    folder.mkdir()
    save_file({"w": tensor.contiguous()}, str(folder / "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_expectation_check_accepts_a_right_sampler_and_rejects_a_wrong_one(tmp_path, method):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(400, 500, generator=gen)
    d1, d2 = torch.randn(base.shape, generator=gen), torch.randn(base.shape, generator=gen)
    w, p = (0.5, 0.5), 0.5

    def sample(rescale: float) -> torch.Tensor:
        a = [wi * d * (torch.rand(base.shape, generator=gen) >= p) * rescale for wi, d in zip(w, (d1, d2))]
        if method == "dare_linear":
            return base + a[0] + a[1]
        agree = torch.sign(a[0]) == torch.sign(a[1])
        larger = torch.where(a[0].abs() >= a[1].abs(), a[0], a[1])
        return base + torch.where(agree | (a[0] == 0) | (a[1] == 0), a[0] + a[1], larger)

    spec = {"base": _dare_folder(tmp_path / "base", base), "method": method, "weights": list(w), "drop": p,
            "check": "expectation", "finetunes": [_dare_folder(tmp_path / "ft0", base + d1),
                                                  _dare_folder(tmp_path / "ft1", base + d2)],
            "ours": _dare_folder(tmp_path / "ours", sample(1 / (1 - p))),  # survivors rescaled by 1/(1 - p): right
            "peer": _dare_folder(tmp_path / "peer", sample(1.0))}  # not rescaled: the expectation is halved
    found = peerlib.run_json(sys.executable, mergekit_vs.COMPARE, json.dumps(spec))
    assert found["z_n"] == base.numel()
    assert abs(found["z_mean_ours"]) < 0.01 and abs(found["z_meansq_ours"] - 1) < 0.01
    assert abs(found["z_meansq_peer"] - 1) > 0.05


def _row(strength, effect, ppl_ratio, coherent=1.0, plausible=1.0):
    import math

    return {"strength": strength, "effect": {"mean": effect, "low": effect - 0.1, "high": effect + 0.1},
            "log_ppl_change": {"mean": math.log(ppl_ratio)}, "coherent": coherent, "base_coherent": 0.95,
            "plausible": plausible}


def test_repeng_best_strength_within_a_coherence_budget():
    rows = [_row(0.0, 0.0, 1.0), _row(0.5, 0.10, 1.2), _row(1.0, 0.20, 1.4), _row(2.0, 0.40, 3.0),
            _row(-0.5, 0.05, 1.1), _row(-1.0, 0.30, 1.3, coherent=0.5)]
    calibrate, plausible = repeng_vs.BUDGETS.values()
    assert repeng_vs.best_within(rows, "high", calibrate)["strength"] == 1.0  # 2.0 is past the perplexity budget
    assert repeng_vs.best_within(rows, "high", plausible)["strength"] == 2.0
    assert repeng_vs.best_within(rows, "low", calibrate)["strength"] == -0.5  # -1.0 is incoherent
    assert repeng_vs.best_within([_row(1.0, 0.2, 2.0)], "high", calibrate) is None


def test_peer_scripts_refuse_bad_input_before_any_work():
    for script, args in (("peers/mergekit_vs.py", ["--cases", "ties,nope"]), ("peers/repeng_vs.py", ["--strengths", "x"]),
                         ("peers/repeng_vs.py", ["--steer", "layer 13-25"]),
                         ("peers/easyedit_vs.py", ["--easyedit", "/nonexistent"]), ("scale.py", ["--sizes", "2t"]),
                         ("run.py", ["--stored"])):
        done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (script, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error:")
