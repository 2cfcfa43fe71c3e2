"""personaedit merge against mergekit 0.1.5 on the same merges of the default model, side by side.

Two "fine-tunes" of the default model are built (the base plus a dense random perturbation of every linear weight
of all 30 blocks, 1e-3 · N(0, 1), two seeds); mergekit merges the fine-tunes, personaedit the vectors
`vector from-finetune` reads from them (θ_ft − θ_base, the difference mergekit takes too). Every merge runs as a
whole command, ours and mergekit's in turn (A B A B ...), each in a fresh process; wall time, CPU time and peak
RSS come from the kernel's accounting of the finished process. Then the outputs are compared tensor by tensor.

Normalisation: mergekit's `ties` divides the agreeing weighted values by the sum of the agreeing weights, its
`dare_ties` and `dare_linear` do not divide; personaedit divides by the number of agreeing vectors by default
(`--normalize count`), so for the same merge ours is run with `--normalize weight-sum` (ties) and `--normalize none`
(dare_ties), which are mergekit's arithmetic; the negation case shows what the defaults do with weight −1.
DARE's masks are random in both tools, so a DARE output is checked against the method's expectation and variance
per entry (closed form, below), not against the other tool's output.

Run: python benchmarks/peers/mergekit_vs.py [--pairs 3] [--cases task_arithmetic,ties,...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))
from common import row  # noqa: E402
from peerlib import (OUR_PYTHON, alternate, ensure_venv, fail, installed_version, load_average, measure,  # noqa: E402
                     print_pairs, recorded, run_json)

MERGEKIT = "mergekit==0.1.5"
PERSONAEDIT = str(OUR_PYTHON.parent / "personaedit")
TARGETS = {"wall": 0.5, "peak_mb": 0.15}  # issue 18: a merge <= 0.5x mergekit's wall time and <= 0.15x its peak RSS

# name: (method, weights, options for ours, parameters for mergekit, what the outputs should do)
CASES = {
    "task_arithmetic": ("task_arithmetic", (0.5, 0.5), [], {}, "equal"),
    "ties": ("ties", (0.5, 0.5), ["--density", "0.3", "--normalize", "weight-sum"], {"density": 0.3}, "trim"),
    "dare_ties": ("dare_ties", (0.5, 0.5), ["--drop", "0.5", "--normalize", "none"], {"density": 0.5}, "expectation"),
    "dare_linear": ("dare_linear", (0.5, 0.5), ["--drop", "0.5"], {"density": 0.5}, "expectation"),
    "negation": ("task_arithmetic", (-1.0,), [], {}, "equal"),
    "ties_negation": ("ties", (-1.0,), ["--density", "0.3"], {"density": 0.3}, "opposite"),
}

BUILD = r"""
import json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from personaedit.merge import model_folder
base = model_folder("default")
work = Path(sys.argv[1])
tensors = load_file(base / "model.safetensors")
touched = [k for k, t in tensors.items() if t.dim() == 2 and "embed" not in k]
for seed in (0, 1):
    out = work / f"finetune-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tuned = {k: (t + 1e-3 * torch.randn(t.shape, generator=gen) if k in touched else t) for k, t in tensors.items()}
    save_file(tuned, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.suffix != ".safetensors" and f.name != "personaedit-cache.json":
            shutil.copy(f, out / f.name)
print(json.dumps({"base": str(base), "touched": len(touched), "entries": sum(tensors[k].numel() for k in touched),
                  "model_mb": (base / "model.safetensors").stat().st_size / 2**20}))
"""

# Compares two merged folders tensor by tensor; for DARE, each output against the per-entry expectation and
# variance of the method. With q = 1 − p, a = w1 δ1 / q and b = w2 δ2 / q:
#   dare_linear: E = w1 δ1 + w2 δ2, Var = (a² + b²) q p;
#   dare_ties (no division): both kept (q²) → a + b if the signs agree, else the one of larger magnitude; one kept
#   (q p each) → it; none → 0. E and E[X²] follow; Var = E[X²] − E².
# The standardised residual (X − E)/√Var over all entries has mean ≈ 0 and mean square ≈ 1 for a correct sampler.
COMPARE = r"""
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open

def tensors(folder):
    names = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        h = safe_open(str(f), "pt")
        for k in h.keys():
            names[k] = h
    return names

spec = json.loads(sys.argv[1])
base, ours, peer = tensors(spec["base"]), tensors(spec["ours"]), tensors(spec["peer"])
tunes = [tensors(f) for f in spec["finetunes"]]
weights, p = spec["weights"], spec.get("drop", 0.0)
q = 1 - p
result = {"only_ours": sorted(set(ours) - set(peer)), "only_peer": sorted(set(peer) - set(ours)),
          "max_diff": 0.0, "max_change": 0.0, "entries": 0, "dot": 0.0, "norm_ours": 0.0, "norm_peer": 0.0, "differing": 0}
stats = {"ours": [0.0, 0.0, 0], "peer": [0.0, 0.0, 0]}
for k in sorted(set(ours) & set(peer)):
    b = base[k].get_tensor(k).double() if k in base else None
    o, m = ours[k].get_tensor(k).double(), peer[k].get_tensor(k).double()
    diff = (o - m).abs()
    result["max_diff"] = max(result["max_diff"], float(diff.max()))
    result["differing"] += int((diff > 0).sum())
    result["entries"] += diff.numel()
    if b is None:
        continue
    do, dm = o - b, m - b
    result["max_change"] = max(result["max_change"], float(do.abs().max()))
    result["dot"] += float((do * dm).sum()); result["norm_ours"] += float((do * do).sum()); result["norm_peer"] += float((dm * dm).sum())
    if spec["check"] != "expectation":
        continue
    deltas = [t[k].get_tensor(k).double() - b for t in tunes]
    if all(float(d.abs().max()) == 0 for d in deltas):
        continue
    a_, b_ = (w * d / q for w, d in zip(weights, deltas))
    if spec["method"] == "dare_linear":
        mean, var = q * (a_ + b_), (a_ * a_ + b_ * b_) * q * p
    else:
        both = torch.where(torch.sign(a_) == torch.sign(b_), a_ + b_, torch.where(a_.abs() >= b_.abs(), a_, b_))
        mean = q * q * both + q * p * (a_ + b_)
        var = q * q * both * both + q * p * (a_ * a_ + b_ * b_) - mean * mean
    ok = var > 0
    for side, d in (("ours", do), ("peer", dm)):
        z = (d - mean)[ok] / var[ok].sqrt()
        stats[side][0] += float(z.sum()); stats[side][1] += float((z * z).sum()); stats[side][2] += int(z.numel())
result["cosine"] = result["dot"] / max((result["norm_ours"] * result["norm_peer"]) ** 0.5, 1e-300)
for side, (s, s2, n) in stats.items():
    if n:
        result[f"z_mean_{side}"], result[f"z_meansq_{side}"], result["z_n"] = s / n, s2 / n, n
print(json.dumps(result))
"""


def mergekit_config(case: str, base: str, finetunes: list[Path]) -> str:
    method, weights, _, params, _ = CASES[case]
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: float32", "models:"]
    for tune, weight in zip(finetunes, weights):
        extra = "".join(f", {k}: {v}" for k, v in params.items())
        lines += [f"  - model: {tune}", f"    parameters: {{weight: {weight}{extra}}}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="A B pairs per merge (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--work", type=Path, default=None, help="folder for the fixtures and outputs (default: a temp dir)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        fail(f"unknown case {unknown[0]!r} (valid: {', '.join(CASES)})")
    if args.pairs < 1:
        fail("--pairs must be >= 1")
    with recorded("mergekit_vs" + ("" if cases == list(CASES) else "-" + "+".join(cases))):
        compare(cases, args.pairs, args.work)


def compare(cases: list[str], pairs_per_case: int, work_dir: Path | None) -> None:
    peer_python = ensure_venv("mergekit", [MERGEKIT])
    mergekit_yaml = str(peer_python.parent / "mergekit-yaml")
    work = work_dir or Path(tempfile.mkdtemp(prefix="mergekit-vs-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        fixture = run_json(OUR_PYTHON, BUILD, str(work))
        finetunes = [work / "finetune-0", work / "finetune-1"]
        vectors = [work / "vector-0", work / "vector-1"]
        for tune, vector in zip(finetunes, vectors):
            if not vector.is_dir():
                convert = measure([PERSONAEDIT, "vector", "from-finetune", "--base", fixture["base"],
                                   "--finetuned", str(tune), "--out", str(vector)])
                if convert.returncode:
                    raise SystemExit(f"vector from-finetune failed for {tune}")
                print(f"vector from-finetune {tune.name}: {convert.wall:.1f} s, peak {convert.peak_mb:.0f} MiB "
                      "(once per fine-tune; not in the pairs)")
        print(f"mergekit {installed_version(peer_python, 'mergekit')} ({peer_python.parent.parent}); base "
              f"{fixture['base']} ({fixture['model_mb']:.0f} MiB); two fine-tunes, {fixture['touched']} tensors "
              f"({fixture['entries'] / 1e6:.0f}M entries) perturbed; load average {load_average()}")
        for case in cases:
            method, weights, ours_options, _, check = CASES[case]
            config = work / f"{case}.yml"
            config.write_text(mergekit_config(case, fixture["base"], finetunes))
            ours_out, peer_out = work / f"ours-{case}", work / f"peer-{case}"
            ours = [PERSONAEDIT, "merge", "--base", fixture["base"], "--method", method, *ours_options,
                    *[f"--vector={v}={w}" for v, w in zip(vectors, weights)], "--out", str(ours_out)]
            peer = [mergekit_yaml, str(config), str(peer_out)]
            print(f"{case}: ours `{' '.join(ours[1:])}`; mergekit `mergekit-yaml {config.name}` "
                  f"({', '.join(f'{k}={v}' for k, v in CASES[case][3].items()) or 'defaults'})", flush=True)
            pairs = alternate(case, ours, peer, pairs=pairs_per_case,
                              before=(["rm", "-rf", str(ours_out)], ["rm", "-rf", str(peer_out)]), log_dir=work)
            # the last pair's outputs are still there: compare them
            spec = {"base": fixture["base"], "ours": str(ours_out), "peer": str(peer_out), "method": method,
                    "finetunes": [str(f) for f in finetunes][:len(weights)], "weights": list(weights),
                    "drop": 0.5 if method.startswith("dare") else 0.0, "check": check}
            found = run_json(OUR_PYTHON, COMPARE, json.dumps(spec))
            print_pairs(pairs, TARGETS)
            report_agreement(case, check, found)
        print(f"load average at the end: {load_average()}")
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def report_agreement(case: str, check: str, found: dict) -> None:
    if found["only_ours"] or found["only_peer"]:
        print(f"    tensors only in ours: {found['only_ours'][:3]}; only in mergekit's: {found['only_peer'][:3]}")
    print(f"    outputs: max |ours − mergekit| {found['max_diff']:.3g} ({found['differing']} entries differ); largest "
          f"change from the base {found['max_change']:.3g}; cosine of the two changes {found['cosine']:+.4f}")
    if check == "equal":
        print(row(f"{case}: max |ours − mergekit| over all tensors", f"{found['max_diff']:.3g}", "0", found["max_diff"] == 0))
    elif check == "trim":
        # mergekit keeps int(density · n) entries of each tensor by a sort, personaedit those at or above the
        # round(density · n)-th largest magnitude: the two can differ by an entry or a tie at the threshold
        share = found["differing"] / max(found["entries"], 1)
        print(row(f"{case}: share of entries that differ from mergekit's", f"{share:.1e}", "<= 1e-5", share <= 1e-5))
    elif check == "opposite":
        # personaedit keeps the negation (−δ); mergekit's weight-sum normalisation undoes it (+δ)
        print(row(f"{case}: cosine of the changes, ours vs mergekit", f"{found['cosine']:+.4f}", "-1 (flip)",
                  found["cosine"] < -0.99))
    else:
        for side in ("ours", "peer"):
            mean, meansq = found.get(f"z_mean_{side}"), found.get(f"z_meansq_{side}")
            if mean is not None:
                ok = abs(mean) < 5 / found["z_n"] ** 0.5 and abs(meansq - 1) < 0.01
                print(row(f"{case} {'ours' if side == 'ours' else 'mergekit'}: residual / sd vs expectation",
                          f"{mean:+.4f}, {meansq:.3f}", "0, 1", ok))
        print(f"    (standardised residual of the sampled merge against the per-entry DARE expectation: its mean and "
              f"mean square over {found.get('z_n', 0)} entries)")


if __name__ == "__main__":
    main()
