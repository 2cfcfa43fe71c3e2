"""Past one process: `vector train` in 1 vs 2 CPU processes, and bench cells on Ray with 1 vs 2 workers.

train: the default model (SmolLM2-135M) on the CPU, LoRA rank 8, 32 fixed training examples put in the output
folder (no distillation), global batch 8, one epoch: 4 optimiser steps, no checkpoint. One process is
`personaedit vector train ...` (torch's own threads: the cores); two are `accelerate launch --multi_gpu
--num_processes 2 -m personaedit vector train ...` with no visible GPU (torchrun, gloo, one thread each: what
`accelerate launch` sets); `--kinds 1t` adds one process with one thread (OMP_NUM_THREADS=1). Reported per run:
the training seconds the command prints (trainer.train, rounded to 1 s), the wall time of the whole command
(start-up and model load included) and the CPU seconds of all its processes (less sensitive than time to other
jobs on a shared machine); medians over --repeats runs, the kinds alternating.

ray: a tiny random Llama (tests/tiny.py: 3 layers, width 32) under the real offline text judge and the quick suite;
the grid prompt, steer (layer 1, 8 pairs) x extraversion high / low x strength 1: 4 Ray tasks of one cell each.
Per run a fresh local Ray instance with 1 or 2 CPUs (workers), started before the clock; the driver's base
measurement is copied from a first run, so the time is the Ray phase alone: worker start-up, each worker loading
the model and judge once, fitting and measuring. RAY_worker_niceness=0 keeps the workers at the driver's priority
(Ray lowers it by default, which on a busy shared machine measures the other jobs).

Run: nice -n 10 python benchmarks/at_scale.py train|ray [--repeats 3] [--kinds 1,2,1t]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

EXAMPLES = 32
TRAIN = ["vector", "train", "--model", "default", "--persona", "extraversion=high", "--batch-size", "8",
         "--epochs", "1", "--save-steps", "1000", "--lora-rank", "8"]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_prefix(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "personaedit"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "personaedit"]


def child_cpu() -> float:
    """CPU seconds (user + system) of every finished child process and theirs (the launcher waits for its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


KINDS = {"1": "1 process (torch's threads)", "2": "2 processes (1 thread each)", "1t": "1 process, 1 thread"}


def train_once(root: Path, kind: str) -> tuple[float, float, float]:
    """(training seconds as printed, wall seconds, CPU seconds of all its processes) of one run of `kind` (a key of
    KINDS) into a fresh folder holding the examples."""
    from personaedit.vectors.distill import Example, save_examples, training_questions

    out = root / f"vector-{kind}-{time.monotonic_ns()}"
    out.mkdir()
    reply = "I love meeting new people, talking all evening and trying whatever the group suggests next!"
    save_examples(out / "examples.jsonl", [Example(q, reply) for q in training_questions()[:EXAMPLES]])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **({"OMP_NUM_THREADS": "1"} if kind == "1t" else {})}
    start, cpu = time.perf_counter(), child_cpu()
    proc = subprocess.run([*launch_prefix(2 if kind == "2" else 1), *TRAIN, "--out", str(out)], env=env, capture_output=True,
                          text=True)
    wall, cpu = time.perf_counter() - start, child_cpu() - cpu
    found = re.search(r"4 steps, loss [\d.]+, (\d+) s training\)", proc.stderr)
    if proc.returncode != 0 or not found:
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(out)
    return float(found.group(1)), wall, cpu


def bench_train(repeats: int, kinds: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, "-m", "personaedit", "models"], check=True, capture_output=True)  # converted once
        runs: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
        for repeat in range(repeats):
            for kind in kinds:
                before = load()
                training, wall, cpu = train_once(root, kind)
                runs[kind].append((training, wall, cpu))
                print(f"run {repeat + 1}, {KINDS[kind]}: training {training:.0f} s, wall {wall:.1f} s, CPU {cpu:.1f} s, "
                      f"load {before} -> {load()}", flush=True)
    for kind, values in runs.items():
        training, wall, cpu = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"{KINDS[kind]}: training median {training:.0f} s {sorted(v[0] for v in values)}, wall median "
              f"{wall:.1f} s {sorted(round(v[1], 1) for v in values)}, CPU median {cpu:.1f} s "
              f"{sorted(round(v[2], 1) for v in values)}")


def bench_ray(repeats: int) -> None:
    import ray

    from personaedit.bench import parse_personas, run_bench
    from personaedit.eval.text_judge import TextJudge
    from personaedit.models import load_model
    from test_loading import save_tiny

    os.environ["RAY_worker_niceness"] = "0"
    options = {"steer": {"layer": "1", "pairs": 8}}
    personas = parse_personas(["extraversion=high", "extraversion=low"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lm = load_model(str(save_tiny(root / "model")))
        judge = TextJudge.load()
        template = root / "template"
        run_bench(lm, ["prompt"], personas, [0.0], template, judge=judge)  # the driver's base rows, measured once
        runs: dict[int, list[float]] = {1: [], 2: []}
        for repeat in range(repeats):
            for workers in (1, 2):
                out = root / f"bench-{workers}-{repeat}"
                shutil.copytree(template, out)
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                before = load()
                start = time.perf_counter()
                run_bench(lm, ["prompt", "steer"], personas, [1.0], out, backend="ray", method_options=options,
                          judge=judge)
                runs[workers].append(time.perf_counter() - start)
                ray.shutdown()
                print(f"run {repeat + 1}, {workers} worker(s): 4 cells in {runs[workers][-1]:.1f} s, load {before} -> "
                      f"{load()}", flush=True)
    medians = {w: statistics.median(v) for w, v in runs.items()}
    for workers, values in runs.items():
        print(f"{workers} worker(s): median {medians[workers]:.1f} s for 4 cells ({4 / medians[workers] * 60:.1f} "
              f"cells/min) {sorted(round(v, 1) for v in values)}")
    print(f"throughput 2 / 1 workers: {medians[1] / medians[2]:.2f}")
    print(json.dumps({"seconds": runs}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["train", "ray"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="1,2", help=f"train: comma-separated, of {', '.join(KINDS)}")
    args = parser.parse_args()
    print(f"load average before: {load()}", flush=True)
    if args.what == "train":
        bench_train(args.repeats, args.kinds.split(","))
    else:
        bench_ray(args.repeats)
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
