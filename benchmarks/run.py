"""Run every performance benchmark and print their target rows in one table.

Each benchmark runs in its own process (so one's memory peak or thread setting does not colour the
next) and prints rows through common.row (measured value, target, verdict); this collects them. Quality benchmarks
(steer_calibration, palette_edit main/ablation, vector_sweep, personalityedit_table, `personaedit bench`)
take tens of minutes and are run on their own; docs/BENCHMARKS.md has their commands and numbers.

`--peers` runs the side-by-side benchmarks of benchmarks/peers/ instead: each sets up its peer (mergekit, repeng;
EasyEdit too when $EASYEDIT names a checkout of it) in its own virtual environment on first use and prints the
ratios ours/peer (median [min, max] over the pairs).

python benchmarks/run.py [--only load_time,merge_cost] [--quick] [--peers]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# (script, arguments, arguments with --quick): the performance targets of every issue.
BENCHMARKS = [
    ("load_time.py", [], ["--repeats", "3"]),
    ("generation_throughput.py", [], ["--repeats", "1"]),
    ("activation_costs.py", [], ["--prompts", "64", "--repeats", "1"]),
    ("palette_edit.py", ["costs"], ["costs", "--queries", "2"]),
    ("palette_edit.py", ["stats"], ["stats", "--samples", "1000"]),
    ("merge_cost.py", [], []),
]

# The side-by-side benchmarks (--peers): A B A B pairs against the tool a user would pick instead.
PEERS = [
    ("peers/mergekit_vs.py", [], ["--pairs", "1", "--cases", "task_arithmetic,ties,negation"]),
    ("peers/repeng_vs.py", [], ["--pairs", "1", "--repeats", "1"]),
]
if os.environ.get("EASYEDIT"):  # EasyEdit is not on PyPI: a checkout of it (see peers/easyedit_vs.py)
    PEERS.append(("peers/easyedit_vs.py", [], ["--requests", "2"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated script names (without .py)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument("--peers", action="store_true", help="the side-by-side benchmarks against mergekit and repeng")
    args = parser.parse_args()
    pool = PEERS if args.peers else BENCHMARKS
    chosen = [b for b in pool if not args.only or Path(b[0]).stem in args.only.split(",")]
    table: list[str] = []
    for script, full, quick in chosen:
        command = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        started = time.perf_counter()
        print(f"running {' '.join(command[1:])}", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            table.append(f"{script}: FAILED (exit {done.returncode}, {seconds:.0f} s): {tail}")
            continue
        rows = [line for line in done.stdout.splitlines() if "   target " in line]
        table += rows or [f"{script}: no target rows"]
    print("\n".join(table))


if __name__ == "__main__":
    main()
