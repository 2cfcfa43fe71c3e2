"""Run every performance benchmark and print their target rows in one table.

Each benchmark runs in its own process (so one's memory peak or thread setting does not colour the
next) and prints rows through common.row (measured value, target, verdict); this collects them. Quality benchmarks
(steer_calibration, palette_edit main/ablation, vector_sweep, personalityedit_table, `personaedit bench`)
take tens of minutes and are run on their own; docs/BENCHMARKS.md has their commands and numbers.

`--peers` runs the side-by-side benchmarks of benchmarks/peers/ instead: each sets up its peer (mergekit, repeng;
EasyEdit too when $EASYEDIT names a checkout of it) in its own virtual environment on first use and prints the
ratios ours/peer (median [min, max] over the pairs). Each peer script keeps its last complete output in
benchmarks/peers/results/ (with the command, the time, the commit and the load average); `--peers --stored` prints
the ratio rows from those files without running anything (the full runs take an hour or more on 2 cores).

python benchmarks/run.py [--only load_time,merge_cost] [--quick] [--peers [--stored]]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "peers" / "results"  # as peers/peerlib.py's RESULTS (not imported: this process stays light)

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
    parser.add_argument("--stored", action="store_true",
                        help="with --peers: print the rows of the stored outputs in benchmarks/peers/results/ instead")
    args = parser.parse_args()
    if args.stored:
        if not args.peers:
            print("error: --stored goes with --peers", file=sys.stderr)
            raise SystemExit(2)
        print(stored_rows(args.only.split(",") if args.only else None))
        return
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
        rows = [line for line in done.stdout.splitlines() if is_row(line)]
        table += rows or [f"{script}: no target rows"]
    print("\n".join(table))


def is_row(line: str) -> bool:
    return "   target " in line


def stored_rows(only: list[str] | None) -> str:
    """The header and target rows of each stored peer output (the script's name before the first '-' is what
    --only selects)."""
    files = sorted(f for f in RESULTS.glob("*.txt") if not only or f.stem.split("-")[0] in only)
    if not files:
        print(f"error: no stored peer outputs in {RESULTS} (run python benchmarks/run.py --peers first)", file=sys.stderr)
        raise SystemExit(2)
    out: list[str] = []
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines()
        out += [f"== {f.relative_to(HERE.parent)}", *(line for line in lines if line.startswith("# ")),
                *(line for line in lines if is_row(line)), ""]
    return "\n".join(out).rstrip()


if __name__ == "__main__":
    main()
