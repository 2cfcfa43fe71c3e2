"""Shared pieces of the side-by-side benchmarks: a peer's own virtual environment, whole-process timing of two
commands taken in turn (A B A B ...), and ratio rows with their min / median / max.

This module imports no torch: a child's peak RSS (ru_maxrss) starts from what its parent held when it forked, so
the process that times the commands stays small. Work that needs torch (building fixtures, comparing outputs) runs
in child processes too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from personaedit.fileio import write_text_atomic  # imports no torch

RESULTS = Path(__file__).parent / "results"  # each script's last complete output, read by run.py --peers --stored
VENVS = Path(os.environ.get("PERSONAEDIT_PEER_VENVS", "/work/venvs"))
TORCH = "torch==2.13.0"  # first, so that a peer's requirements find a CPU torch and pull no CUDA build
REPO = Path(__file__).resolve().parents[2]
OUR_PYTHON = Path(sys.executable)


def ensure_venv(name: str, packages: Sequence[str], *, extra: Sequence[Sequence[str]] = ()) -> Path:
    """The python of VENVS/name with `packages` installed (torch pinned first); `extra` are further pip argument
    lists run after them (e.g. an uninstall). Reused when the same pins were installed before."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / "personaedit-peer.json"
    wanted = {"packages": [TORCH, *packages], "extra": [list(e) for e in extra]}
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return python
    print(f"setting up {venv}: {TORCH}, then {' '.join(packages)} (minutes)", file=sys.stderr, flush=True)
    nice = ["nice", "-n", "10"]
    if not python.is_file():
        subprocess.run([*nice, sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [*nice, str(python), "-m", "pip"]
    subprocess.run([*pip, "install", "--quiet", TORCH], check=True)
    subprocess.run([*pip, "install", "--quiet", *packages], check=True)
    for arguments in extra:
        subprocess.run([*pip, *arguments], check=True)
    write_text_atomic(stamp, json.dumps(wanted))
    return python


def installed_version(python: Path, distribution: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@dataclass(frozen=True)
class Run:
    wall: float  # seconds
    cpu: float  # user + system seconds of the command and the children it waited for
    peak_mb: float  # largest resident set of a single process (ru_maxrss), MiB
    returncode: int


def measure(command: Sequence[str], *, env: Mapping[str, str] | None = None, log: Path | None = None) -> Run:
    """Run `command` to its end; its wall time, CPU time and peak RSS as the kernel accounts the finished child."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        start = time.monotonic()
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, env=None if env is None else {**os.environ, **env})
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - start
    finally:
        if log:
            out.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, process.returncode)


@dataclass
class Pairs:
    """Runs of command A (ours) and B (the peer) taken in turn."""

    name: str
    a: list[Run]
    b: list[Run]

    def ratios(self, field: str) -> list[float]:
        return [getattr(x, field) / getattr(y, field) for x, y in zip(self.a, self.b)]


def alternate(name: str, a: Sequence[str], b: Sequence[str], *, pairs: int = 3, env: Mapping[str, str] | None = None,
              before: tuple[Sequence[str] | None, Sequence[str] | None] = (None, None),
              log_dir: Path | None = None) -> Pairs:
    """A B A B ...: `pairs` runs of each, in turn, so a drift in the machine's speed hits both. `before` holds a
    command for each side run untimed before each of its runs (e.g. to remove its previous output folder). A failed
    run stops it."""
    result = Pairs(name, [], [])
    for i in range(pairs):
        for label, command, runs, prepare in (("A", a, result.a, before[0]), ("B", b, result.b, before[1])):
            if prepare:
                subprocess.run(list(prepare), check=True)
            log = log_dir / f"{name.replace(' ', '_')}-{label}{i}.log" if log_dir else None
            run = measure(command, env=env, log=log)
            if run.returncode != 0:
                where = f" (output in {log})" if log else ""
                raise SystemExit(f"{name}: {label} exited {run.returncode}: {shlex.join(command)}{where}")
            runs.append(run)
            print(f"  {name} {label}{i + 1}: {run.wall:.2f} s wall, {run.cpu:.2f} s cpu, {run.peak_mb:.0f} MiB peak",
                  file=sys.stderr, flush=True)
    return result


def spread(values: Sequence[float], spec: str = ".2f") -> str:
    """'median (min–max)'."""
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}–{max(values):{spec}})"


def ratio_row(name: str, values: Sequence[float], target: float | None = None, *, higher_is_better: bool = False,
              spec: str = ".2f") -> str:
    """One row that benchmarks/run.py collects: the median ratio with its min and max, and the target's verdict
    (read from the median)."""
    median = statistics.median(values)
    value = f"{median:{spec}}x [{min(values):{spec}}, {max(values):{spec}}]"
    if target is None:
        return f"{name:<58} {value:>24}   target {'-':<10}"
    ok = median >= target if higher_is_better else median <= target
    bound = f"{'>=' if higher_is_better else '<='} {target:g}x"
    return f"{name:<58} {value:>24}   target {bound:<10} {'met' if ok else 'NOT MET'}"


def print_pairs(pairs: Pairs, targets: Mapping[str, float] | None = None) -> None:
    """The A/B ratios of wall, CPU and peak RSS, and each side's medians."""
    targets = targets or {}
    for field, label in (("wall", "wall"), ("cpu", "cpu"), ("peak_mb", "peak RSS")):
        print(ratio_row(f"{pairs.name}: {label} ours/peer", pairs.ratios(field), targets.get(field)))
    for side, runs in (("ours", pairs.a), ("peer", pairs.b)):
        print(f"    {side}: wall {spread([r.wall for r in runs])} s, cpu {spread([r.cpu for r in runs])} s, "
              f"peak {spread([r.peak_mb for r in runs], '.0f')} MiB")


# Prepended to the code of a measuring child process: its own resident set, current (VmRSS) or high-water mark
# (VmHWM), in MiB. After exec the high-water mark is the child's own, whatever its parent held.
RSS_FUNCTION = """
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
"""


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2 (before any expensive work)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_json(python: Path | str, code: str, *args: str, env: Mapping[str, str] | None = None) -> dict:
    """Run `code` (which prints one JSON object on its last line) under `python`; that object."""
    done = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"helper failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


@contextlib.contextmanager
def recorded(name: str) -> Iterator[None]:
    """Everything printed to stdout inside is kept too and, when the block ends without an error, written to
    RESULTS/name.txt after a header (`# ` lines: the command, UTC start and end, commit, load average at both ends),
    so that `benchmarks/run.py --peers --stored` can print the ratios again without re-running."""
    kept = io.StringIO()
    began, load = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), load_average()
    command = shlex.join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    real = sys.stdout
    sys.stdout = _Tee(real, kept)
    try:
        yield
    finally:
        sys.stdout = real
    header = [f"# command: {command}", f"# started {began} UTC, ended {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} "
              f"UTC; commit {_commit()}; load average {load} at the start, {load_average()} at the end; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
              + "".join(f"; {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))]
    write_text_atomic(RESULTS / f"{name}.txt", "\n".join(header) + "\n" + kept.getvalue())
