"""Cost of merging two personality vectors into the default model: wall time and peak RSS.

Each merge runs in a fresh subprocess that reports its own peak RSS (VmHWM, Linux), compared with the size
of the model's safetensors file (target: peak <= 1.5x one model file; the best-known merging tool takes
8-10 s task arithmetic, 35 s TIES, 14 s DARE, 2.5-2.8 GB peak on this model).
The two vectors are random perturbations of every linear weight (q/k/v/o, gate/up/down of all 30 layers),
dense by default (as a full fine-tune's vector is) or rank-r factors (as a LoRA's is); `--embeddings` adds the
embedding matrix (28M entries, the largest tensor).
Run: python benchmarks/merge_cost.py [--kind dense|lowrank] [--rank 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import row  # noqa: E402

from personaedit.edits import BaseModelInfo, Delta, WeightEdit  # noqa: E402
from personaedit.merge import model_folder  # noqa: E402
from personaedit.merge.engine import Checkpoint  # noqa: E402
from personaedit.models import load_model  # noqa: E402
from personaedit.persona import Persona  # noqa: E402

METHODS = {
    "task_arithmetic": {},
    "ties": {"density": 0.3, "normalize": True},
    "dare_ties": {"drop": 0.5, "seed": 0, "normalize": True},
}
TARGET_SECONDS = {"task_arithmetic": 10.0, "ties": 35.0, "dare_ties": 14.0}

# Peak RSS is VmHWM (this process's high-water mark): ru_maxrss would carry over the parent's peak
# across fork and exec, and the parent holds the vectors it built.
CHILD = r"""
import json, sys, time
import torch
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from personaedit.merge import MergeConfig, merge
floor = peak_mb()
config = MergeConfig(**args["config"])
start = time.perf_counter()
result = merge(config, args["out"])
seconds = time.perf_counter() - start
peak = peak_mb()
print(json.dumps({"seconds": seconds, "peak_mb": peak, "import_mb": floor, "merged": result.tensors_merged}))
"""


def build_vectors(folder: Path, kind: str, rank: int, embeddings: bool = False) -> list[Path]:
    lm = load_model("default")
    info = BaseModelInfo.of(lm)
    linear = [(name, tuple(p.shape)) for name, p in lm.model.named_parameters() if p.dim() == 2 and (embeddings or "embed" not in name)]
    del lm
    paths = []
    for seed, persona in enumerate(("extraversion=high", "agreeableness=high")):
        gen = torch.Generator().manual_seed(seed)
        deltas = {}
        for name, shape in linear:
            if kind == "dense":
                deltas[name] = Delta(dense=1e-3 * torch.randn(shape, generator=gen))
            else:
                deltas[name] = Delta(u=0.03 * torch.randn(shape[0], rank, generator=gen), v=0.03 * torch.randn(shape[1], rank, generator=gen))
        path = folder / f"vector-{seed}"
        WeightEdit(method="vector", persona=Persona.parse(persona), base=info, deltas=deltas).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("dense", "lowrank"), default="dense")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--embeddings", action="store_true", help="Perturb the (tied) embedding matrix too.")
    args = parser.parse_args()
    base = model_folder("default")
    checkpoint = Checkpoint(base)
    model_bytes = sum(reader.path.stat().st_size for reader in checkpoint.readers)
    checkpoint.close()
    with tempfile.TemporaryDirectory(prefix="merge-cost-") as tmp:
        vectors = build_vectors(Path(tmp), args.kind, args.rank, args.embeddings)
        vector_mb = sum((p / "tensors.safetensors").stat().st_size for p in vectors) / 1e6
        print(f"base {base} ({model_bytes / 1e6:.0f} MB); two {args.kind} vectors{' with embeddings' if args.embeddings else ''} "
              f"({vector_mb:.0f} MB on disk); "
              f"{args.threads} thread(s)")
        for method in args.methods.split(","):
            config = {"base": "default", "method": method, **METHODS[method],
                      "vectors": [{"path": str(vectors[0]), "weight": 0.5}, {"path": str(vectors[1]), "weight": 0.5}]}
            out = Path(tmp) / f"out-{method}"
            child = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"config": config, "out": str(out), "threads": args.threads})],
                                   capture_output=True, text=True, check=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            ratio = result["peak_mb"] * 1e6 / model_bytes
            print(row(f"{method}: wall time ({result['merged']} tensors merged)", f"{result['seconds']:.1f} s",
                      f"<= {TARGET_SECONDS[method]:g} s", result["seconds"] <= TARGET_SECONDS[method]))
            print(row(f"{method}: peak RSS / model file", f"{result['peak_mb']:.0f} MB = {ratio:.2f}x", "<= 1.5x", ratio <= 1.5))
            print(f"{'':<4}(peak RSS after importing torch and personaedit, before merging: {result['import_mb']:.0f} MB)")
            __import__("shutil").rmtree(out)


if __name__ == "__main__":
    main()
