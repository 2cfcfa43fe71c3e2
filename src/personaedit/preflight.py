"""Checks of user input that run before any model load or fit, so a predictable error costs seconds, not a fit.

Each check raises a `PersonaEditError` with one line that names the bad value and what would be accepted.
Nothing here creates files or folders: a check that fails leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from personaedit.errors import InputFileError, ModelNotFoundError, PersonaEditError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_output_path(path: str | os.PathLike, *, what: str = "--out", folder: bool = False) -> Path:
    """Refuse an output path that could not be written: under a file, a file where a folder is wanted (or the
    reverse), or in a place the process cannot create files in. Probes the nearest existing ancestor."""
    path = Path(path).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise InputFileError(f"{what} {path} is a file; give a folder")
        if not folder and path.is_dir():
            raise InputFileError(f"{what} {path} is a folder; give a file name")
    ancestor = path.parent if not path.exists() else (path if path.is_dir() else path.parent)
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputFileError(f"cannot write {what} {path}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".personaedit-probe-", dir=ancestor)
    except OSError as exc:
        raise InputFileError(f"cannot write {what} {path}: {exc.strerror or exc} in {ancestor}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_device(device: str | None) -> None:
    """`cpu`, `cuda`, `cuda:N`, `mps` or `auto`/None, and only a device this machine has."""
    if device is None or device == "auto":
        return
    import torch

    kind, _, index = device.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise PersonaEditError(f"unknown device {device!r} (valid: auto, cpu, cuda, cuda:N, mps)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise PersonaEditError(f"device {device!r} asked for, but this machine has no CUDA device (use --device cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise PersonaEditError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise PersonaEditError("device 'mps' asked for, but this machine has no MPS device (use --device cpu)")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise PersonaEditError(f"unknown dtype {dtype!r} (valid: {', '.join(DTYPES)})")


def finite_number(text: str, *, what: str) -> float:
    """A float that is finite (not nan, not inf, not an overflow such as 1e309); `what` opens the error line."""
    try:
        value = float(text)
    except ValueError:
        raise PersonaEditError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise PersonaEditError(f"{what} must be a finite number, got {text!r}")
    return value


def parse_edit_option(text: str) -> tuple[Path, float]:
    """`DIR` or `DIR:STRENGTH` -> (folder, strength); STRENGTH a finite number.

    A folder whose own name contains ':' is taken whole when it exists."""
    if ":" not in text or Path(text).is_dir():
        return Path(text), 1.0
    head, tail = text.rsplit(":", 1)
    what = f"--edit {text!r}: expected DIR or DIR:STRENGTH ({text} is not a folder); STRENGTH"
    return Path(head), finite_number(tail, what=what)


def check_model_path(spec: str) -> None:
    """A model given as a local path (a .gguf file, or a folder written as a path) exists: checked before anything
    heavy is imported or loaded. Named models and hub ids pass; loading checks the rest."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {spec}")
    elif not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ModelNotFoundError(f"no such model folder: {spec}")
