"""Test pieces for bench cells on Ray workers, installed in each worker by the setup hook `ray_cells.setup` (and in the
test's own process through monkeypatch): the quick suite cut to a few 4-token replies, the length-based fake judge,
and three methods that behave in a known way:

- `meet` fits only while another process fits it too (each writes its pid into $RAY_CELLS_DIR/meet and waits up to two
  minutes for a second one), so its two cells can finish only in two worker processes at the same time;
- `dies_once`: its first fit anywhere (a marker file in $RAY_CELLS_DIR, made exclusively) kills its own worker process
  with SIGKILL, as a lost node would; later fits succeed;
- `broken` raises on every fit.
Each successful fit is the prompt method's edit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from personaedit.methods import prompt


def meet(lm, persona, *, wait: float = 120.0):
    """Fit only while another process fits this method too."""
    folder = Path(os.environ["RAY_CELLS_DIR"]) / "meet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + wait
    while len(list(folder.iterdir())) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("no other process fitted `meet` at the same time")
        time.sleep(0.05)
    return prompt.fit(lm, persona)


def dies_once(lm, persona):
    """The first fit anywhere kills its process; the others are the prompt method's."""
    try:
        os.close(os.open(Path(os.environ["RAY_CELLS_DIR"]) / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return prompt.fit(lm, persona)
    os.kill(os.getpid(), signal.SIGKILL)


def broken(lm, persona):
    """Never fits."""
    raise RuntimeError("broken on purpose")


def patches() -> list[tuple[Any, str, Any]]:
    """(mapping or object, key or attribute, value) for each change; the test applies them with monkeypatch."""
    import personaedit.eval.text_judge as text_judge
    from personaedit.bench.measure import BENCH_SUITES, BenchSuite
    from personaedit.methods import registry
    from test_suite import FakeJudge

    suite = BenchSuite(max_new_tokens=4, perplexity_texts=2, robustness_questions=2, questions_per_trait=1,
                       neutral_questions=2)
    methods = [(registry._BY_NAME, fit.__name__, registry.Method(fit.__name__, "context", fit, fit.__name__, "a test"))
               for fit in (meet, dies_once, broken)]
    return [(BENCH_SUITES, "quick", suite), (text_judge.TextJudge, "load", classmethod(lambda cls, *a, **k: FakeJudge())),
            *methods]


def setup() -> None:
    """The worker process setup hook."""
    for target, name, value in patches():
        if isinstance(target, dict):
            target[name] = value
        else:
            setattr(target, name, value)
