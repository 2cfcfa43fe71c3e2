"""Cells as Ray tasks on a Ray cluster: an existing one (`--ray-address`, or RAY_ADDRESS), else a local one started
here. Each task fits one (method, persona) and measures its strengths (a worker process loads the model and judge
once, for every task it runs); the driver alone writes the store. A task that fails (it raised, or its worker
process or node died) is recorded in the store's failures table and submitted again, up to `attempts` times in all;
cells that fail every attempt are named in one error at the end, after every other cell is stored (a re-run tries
them again).

On a multi-node cluster every node needs personaedit and the model, and the bench folder must be on a filesystem all
nodes share (fitted edits are saved there)."""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from personaedit.bench.grid import Cell
from personaedit.errors import PersonaEditError
from personaedit.progress import Stage

ATTEMPTS = 3
CONNECT_TIMEOUT = 5.0
OnFailure = Callable[[list[str], int, str, str], None]  # (cell keys, attempt, worker, error)


class CellsFailed(PersonaEditError):
    """Cells that failed on every attempt; every other cell of the run is stored."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


def _ray():
    try:
        import ray
    except ImportError:
        raise PersonaEditError("--backend ray needs Ray: pip install 'personaedit[ray]'") from None
    return ray


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse an address with no Ray cluster behind it in `timeout` seconds (Ray itself would retry for minutes,
    silently). Takes HOST:PORT (the head's GCS port) or ray://HOST:PORT (Ray Client)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise PersonaEditError(f"--ray-address {address!r}: give HOST:PORT of the cluster's head node (its GCS port, "
                               "6379 unless changed), ray://HOST:PORT for Ray Client, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PersonaEditError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with "
                               "`ray start --head`, or check the address") from None


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address`, else RAY_ADDRESS's, else start a local one. In a process already
    connected (a caller's own `ray.init`) that connection is used; an `address` with another port is refused."""
    ray = _ray()
    if ray.is_initialized():
        if address and address != "auto" and "://" not in address:
            current = ray.get_runtime_context().gcs_address or ""
            if address.rpartition(":")[2] != current.rpartition(":")[2]:
                raise PersonaEditError(f"this process is already connected to the Ray cluster at {current}, not {address}")
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target not in ("auto", "local"):
        check_address(target)
    local = {} if target else {"include_dashboard": False}
    ray.init(address=address, log_to_driver=False, **local)


@functools.lru_cache(maxsize=1)
def _worker_model(model_spec: str):
    """The model, loaded once per worker process: Ray reuses a worker for later tasks, and every edit a task
    applies is removed again (also when the task fails), so the next task finds the weights it was loaded with."""
    from personaedit.models import load_model

    return load_model(model_spec)


@functools.lru_cache(maxsize=1)
def _worker_judge():
    from personaedit.eval.text_judge import TextJudge

    return TextJudge.load()


def _task(model_spec: str, cells: Sequence[Cell], suite: str, base: dict[str, Any], edits_dir: str,
          options: dict[str, Any]) -> list[tuple[Cell, dict[str, Any]]]:
    from personaedit.bench.cell import run_group
    from personaedit.bench.measure import bench_suite

    return list(run_group(_worker_model(model_spec), _worker_judge(), bench_suite(suite), cells, base, Path(edits_dir),
                          options))


def _portable(spec: str) -> str:
    """A model spec a worker can resolve from its own working folder: a local path made absolute."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(worker, error) of a failed task, each one line: where it ran when Ray knows, and what went wrong."""
    ray = _ray()
    if isinstance(exc, ray.exceptions.RayTaskError):
        # Ray's message opens with where the task ran: "ray::_task() (pid=123, ip=10.0.0.2)"
        where = re.search(r"pid=(\d+), ip=([^)\s]+)", str(exc))
        worker = f"{where.group(2)} pid {where.group(1)}" if where else "unknown"
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        text = str(cause).strip().splitlines()
        return worker, f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")
    text = str(exc).strip().splitlines()
    return "unknown", f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_groups_on_ray(model_spec: str, groups: Sequence[Sequence[Cell]], suite: str, base: dict[str, Any],
                      edits_dir: Path, method_options: dict[str, dict[str, Any]], *,
                      on_failure: OnFailure = lambda keys, attempt, worker, error: None,
                      on_stage: Stage = lambda _: None, attempts: int = ATTEMPTS,
                      num_cpus: float = 1) -> Iterator[tuple[Cell, dict[str, Any]]]:
    """Submit one task per group (on the cluster `connect` joined, or a local one); yield finished cells as tasks
    complete. A failed task is reported to `on_failure` and submitted again until it has run `attempts` times;
    then `CellsFailed` names what never finished, once every other task is done."""
    ray = _ray()
    connect()
    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(_task)  # retries are ours, so each failure is recorded
    spec, folder = _portable(model_spec), str(Path(edits_dir).resolve())
    pending: dict[Any, tuple[list[Cell], int]] = {}

    def submit(group: list[Cell], attempt: int) -> None:
        ref = remote.remote(spec, group, suite, base, folder, method_options.get(group[0].method, {}))
        pending[ref] = (group, attempt)

    for group in groups:
        submit(list(group), 1)
    lost: list[tuple[list[Cell], str]] = []
    while pending:
        on_stage(f"{len(pending)} Ray task(s) running or queued")
        ready, _ = ray.wait(list(pending), num_returns=1)
        group, attempt = pending.pop(ready[0])
        try:
            finished = ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # the task raised, or its worker (or node) died under it
            worker, error = describe_failure(exc)
            on_failure([cell.key for cell in group], attempt, worker, error)
            if attempt < attempts:
                submit(group, attempt + 1)
            else:
                lost.append((group, error))
            continue
        yield from finished
    if lost:
        keys = [cell.key for group, _ in lost for cell in group]
        first = lost[0][1]
        raise CellsFailed(f"{len(keys)} cell(s) failed on every one of {attempts} attempts and are not stored "
                          f"({', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}; {first}); each attempt is in the "
                          "store's failures table; a re-run tries them again", keys)
