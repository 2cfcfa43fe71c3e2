"""The progress callbacks long jobs take; the command line shows them (cli_progress.py)."""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, int], None]  # (done, total)
StagedProgress = Callable[[str, int, int], None]  # (stage, done, total): one bar per stage
