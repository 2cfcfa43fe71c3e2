"""Atomic file writes: a temporary name in the same folder, then a rename, so a crash never leaves half a file.

Temporaries are named `.{target}.tmp-{pid}-{random}` (and a replaced folder waits as `.{target}.old-{pid}-{random}`
for a moment), so they can be told apart as belonging to one target and to one process. A process killed
outright (`kill -9`, out of memory) cannot clean up; the next atomic write of the same target removes the
temporaries whose process is gone (`remove_stale_temporaries`), so a killed run never leaks a model-sized folder
for longer than until it is run again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

from personaedit.faults import fault_point


def _temporary_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `path` (files or folders beside it) left by processes that are gone; returns
    what was removed. Temporaries of a live process (another run writing the same target) are left alone. A
    previous version moved aside by a write killed before the new one was renamed in is put back at `path`."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]+")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in sorted(entries, key=lambda e: ".old-" not in e.name):  # a replaced version first
        match = pattern.fullmatch(entry.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        if ".old-" in entry.name and not path.exists() and not path.is_symlink():
            # killed between moving the previous version aside and renaming the new one in: put it back
            with contextlib.suppress(OSError):
                os.replace(entry, path)
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def remove_stale_temporaries_in(folder: str | os.PathLike) -> list[Path]:
    """`remove_stale_temporaries` for every target in `folder`: for a folder of many atomic writes (a bench's
    edits) whose next run may not write the same targets again."""
    folder = Path(folder)
    pattern = re.compile(r"\.(.+)\.(?:tmp|old)-\d+-[0-9a-f]+")
    try:
        targets = {match.group(1) for entry in folder.iterdir() if (match := pattern.fullmatch(entry.name))}
    except OSError:
        return []
    return [removed for name in sorted(targets) for removed in remove_stale_temporaries(folder / name)]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp_path = _temporary_name(path)
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's usual mode
    try:
        yield tmp_path
        if tmp_path.exists():
            give_usual_mode(tmp_path)
        fault_point("atomic_path.commit")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def give_usual_mode(path: str | os.PathLike) -> None:
    """Some writers (safetensors, mkstemp) create 0600 files; give the mode the umask would."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def append_line_durably(path: str | os.PathLike, line: str) -> None:
    """Append one line and flush it to disk: after a crash the file holds every line appended before it
    (the last one may be cut short if the machine itself went down; readers drop a cut line)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole. Temporaries left beside
    `path` by killed earlier writes are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # the folder was made private while it is written; give the usual mode
        fault_point("atomic_dir.commit")
        if path.exists():
            old = _temporary_name(path, "old")
            os.replace(path, old)
            fault_point("atomic_dir.swap")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
