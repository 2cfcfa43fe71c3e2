"""Progress of long commands: rich bars on a terminal, plain lines in logs and pipes.

Off a terminal a bar would print nothing useful, so `LineProgress` writes one line per task when it starts,
then at most every `interval` seconds (and at least that often, from a timer, while a step takes long),
and one when it finishes: `stage: done/total (42%), 1 m 10 s elapsed, eta 1 m 35 s`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

INTERVAL_ENV = "PERSONAEDIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} m {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} m"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    shown: bool = False  # a line about it was written (short tasks stay silent)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.total:
            share = min(1.0, self.completed / self.total)
            text = f"{self.description}: {self.completed:g}/{self.total:g} ({share:.0%}), {_duration(elapsed)} elapsed"
            if 0 < share < 1:
                text += f", eta {_duration(elapsed * (1 - share) / share)}"
            return text
        done = f"{self.completed:g} done, " if self.completed else ""
        return f"{self.description}: {done}{_duration(elapsed)} elapsed"


class LineProgress:
    """The part of rich's `Progress` interface the CLI uses (`add_task`, `update`, context manager).

    A task that ends within `interval` seconds prints nothing, so short commands keep a clean stderr (one line
    for an error); a longer one prints a line every `interval` seconds, from a timer while a step takes long,
    and a last line when it ends."""

    def __init__(self, stream: TextIO, interval: float | None = None) -> None:
        self.stream = stream
        self.interval = progress_interval() if interval is None else interval
        self.tasks: dict[int, _Task] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def __enter__(self) -> "LineProgress":
        self._timer = threading.Thread(target=self._heartbeat, name="personaedit-progress", daemon=True)
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=1)
        if exc[0] is None:
            with self._lock:
                for task in self.tasks.values():
                    self._finish(task)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        with self._lock:
            key = len(self.tasks)
            self.tasks[key] = _Task(description, total)
            return key

    def update(self, key: int, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, **_: Any) -> None:
        with self._lock:
            task = self.tasks[key]
            if completed is not None:
                task.completed = completed
            if total is not None:
                task.total = total
            if description is not None:
                task.description = description
            if task.total and task.completed >= task.total:
                self._finish(task)

    def _finish(self, task: _Task) -> None:
        if task.shown and not task.finished:
            self._write(task, task.line() + ", done")
        task.finished = True

    def _heartbeat(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(min(max(self.interval, 0.05), 5.0)):
            if time.monotonic() - last < self.interval:
                continue
            last = time.monotonic()
            with self._lock:
                for task in self.tasks.values():
                    if not task.finished:
                        self._write(task, task.line())

    def _write(self, task: _Task, line: str) -> None:
        task.shown = True
        self.stream.write(line + "\n")
        self.stream.flush()


STATUS_DELAY = 2.0


class LineStatus:
    """rich's `Console.status` off a terminal: the message as a line once the block has run `delay` seconds
    (a quick load prints nothing), then each update as a line."""

    def __init__(self, stream: TextIO, message: str, delay: float = STATUS_DELAY) -> None:
        self.stream = stream
        self.message = message
        self.delay = delay
        self._shown = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(delay, self._show)
        self._timer.daemon = True

    def __enter__(self) -> "LineStatus":
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()

    def _show(self) -> None:
        with self._lock:
            self._shown = True
            self.stream.write(f"{self.message}\n")
            self.stream.flush()

    def update(self, message: str) -> None:
        with self._lock:
            self.message = message
            if self._shown:
                self.stream.write(f"{message}\n")
                self.stream.flush()
