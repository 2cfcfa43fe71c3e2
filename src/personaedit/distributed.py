"""Several processes started by a launcher (`accelerate launch`, `torchrun`, `mpirun`): which one this is, and
waiting for the others.

A launcher tells each process its place through the environment (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, or MPI's
names for them). Without one, this process is rank 0 of 1 and every function here costs an environment lookup.
The process group itself is accelerate's (`PartialState`), the one the HF Trainer then uses.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

T = TypeVar("T")

_RANK = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
_LOCAL_RANK = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
_WORLD_SIZE = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")
_TRUE = ("1", "true", "yes")


def _first_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return max(1, _first_int(_WORLD_SIZE) or 1)


def rank() -> int:
    """This process's place among all of them (0 without a launcher)."""
    return (_first_int(_RANK) or 0) if world_size() > 1 else 0


def local_rank() -> int | None:
    """This process's place on its machine, when a launcher started several processes; else None."""
    return _first_int(_LOCAL_RANK) if world_size() > 1 else None


def is_main() -> bool:
    return rank() == 0


def launcher_wants_cpu() -> bool:
    """`accelerate launch --cpu` (or ACCELERATE_USE_CPU=1): the user asked for CPU processes."""
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in _TRUE


def sharded_training() -> bool:
    """The launcher's accelerate config shards the model (FSDP, or DeepSpeed ZeRO): no rank holds all of it."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def single_cpu_process_of_many() -> bool:
    """`accelerate launch --cpu --num_processes N` (N > 1, no --mpirun_hostfile) starts one process, not N: the
    launcher sets a rendezvous address (it does so only for several processes) and no rank."""
    return launcher_wants_cpu() and "MASTER_ADDR" in os.environ and _first_int(_WORLD_SIZE) is None


def start(cpu: bool) -> None:
    """Join the launcher's process group (gloo on CPU, else the accelerator's backend); nothing without one."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=cpu)


def wait_for_others() -> None:
    """Block until every process got here (a barrier); returns at once without a launcher."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def in_turn(work: Callable[[], T]) -> T:
    """Run `work` in every process, rank 0 first, then the first process of every other machine, then the rest:
    the first ones fill a per-machine cache (a GGUF model converted once) that the later ones find whole."""
    if world_size() == 1:
        return work()
    turn = 0 if rank() == 0 else 1 if local_rank() == 0 else 2
    result = None
    for step in range(3):
        if step == turn:
            result = work()
        if step < 2:
            wait_for_others()
    return result  # type: ignore[return-value]
