"""The progress callbacks long jobs take; the command line shows them (cli_progress.py). Each shape has one name."""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, int], None]  # (done, total)
StagedProgress = Callable[[str, int, int], None]  # (stage, done, total): one bar per stage
LabelledProgress = Callable[[int, int, str], None]  # (done, total, what just finished): a bench's cells
Stage = Callable[[str], None]  # the name of the stage that begins now
