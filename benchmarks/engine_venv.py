"""The virtual environment an inference engine's benchmark runs in (vLLM, llama.cpp): kept apart from the project's,
made once and reused while the engine still imports in it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable


def engine_python(venv: Path, probe: str, install: Callable[[Path], None]) -> Path:
    """The Python of `venv` once the code `probe` runs in it; the venv is made and `install(python)` called first
    when it does not."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", probe]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install(python)
    subprocess.run(check, check=True)
    return python
