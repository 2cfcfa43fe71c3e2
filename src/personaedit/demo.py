"""The demo, the main job: one persona applied by each method family to the default model, the replies to
held-out questions side by side with the text judge's scores, and an HTML page of the same."""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personaedit.calibration import CALIBRATED, calibrated_edit, stored
from personaedit.data import records
from personaedit.eval.effect import Effect, paired_effect
from personaedit.fileio import write_text_atomic
from personaedit.methods import fit_edit
from personaedit.methods.registry import all_methods
from personaedit.models import LoadedModel, generate
from personaedit.persona import Persona
from personaedit.progress import Stage

# Method -> fit options that keep the demo within a few minutes on a laptop CPU (fits are cached on disk
# where the method caches its activations; the method's own defaults apply to everything not named here).
PLAIN = "plain model"
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "prompt": {},
    "steer": {"pairs": 128},
    "dpnle": {"pairs": 256},
    "palette": {"queries": 4},
}


@dataclass
class DemoResult:
    persona: Persona
    questions: list[str]
    columns: dict[str, list[str]]  # column title -> one reply per question
    scores: dict[str, list[float]] = field(default_factory=dict)  # column title -> judge score towards persona per reply
    fit_seconds: dict[str, float] = field(default_factory=dict)

    def mean_score(self, title: str) -> float:
        values = self.scores.get(title, [])
        return sum(values) / len(values) if values else float("nan")

    def effect(self, title: str) -> Effect | None:
        """The column's effect by the protocol eval and bench use: per question, score − the plain model's, with
        its interval (Student's t with a demo's few questions: wide) and verdict. None for the plain model."""
        if title == PLAIN or title not in self.scores or PLAIN not in self.scores:
            return None
        return paired_effect(self.scores[PLAIN], self.scores[title])


def demo_questions(persona: Persona, count: int = 3) -> list[str]:
    """Held-out (test split) situational questions for the persona's first Big Five trait, else neutral ones."""
    traits = [dim.name for dim in persona.dimensions() if dim.kind == "big5"]
    pool = records("situational_questions", "test", trait=traits[0]) if traits else []
    pool += records("neutral_questions", "test")
    return [row["question"] for row in pool[:count]]


def run_demo(
    lm: LoadedModel,
    persona: Persona,
    questions: list[str],
    *,
    methods: dict[str, dict[str, Any]] | None = None,
    judge: Any = None,
    max_new_tokens: int = 48,
    on_step: Stage | None = None,
) -> DemoResult:
    """Answer `questions` with the plain model and under each available method's edit for `persona`."""
    from personaedit.eval.text_judge import TextJudge

    step = on_step or (lambda _: None)
    registered = all_methods()
    chosen = {m: o for m, o in (methods if methods is not None else DEMO_METHODS).items() if m in registered}
    judge = judge or TextJudge.load()
    result = DemoResult(persona, questions, {})
    step(PLAIN)
    result.columns[PLAIN] = generate(lm, questions, max_new_tokens=max_new_tokens)
    for name, options in chosen.items():
        # A calibrated method (activation methods, palette) runs at its calibrated setting for this model when a
        # calibration is at hand (the user's cache, or the one the package ships for the default model); it was
        # fitted with default options.
        calibration = stored(lm, name, persona) if name in CALIBRATED else None
        calibrated = calibration is not None and calibration["chosen"] is not None
        title = f"{name} ({registered[name].family}{', calibrated' if calibrated else ''})"
        step(f"fitting {name}")
        started = time.perf_counter()
        edit = calibrated_edit(lm, name, persona, calibration) if calibrated else fit_edit(name, lm, persona, **options)
        result.fit_seconds[title] = time.perf_counter() - started
        step(f"generating with {name}")
        with edit.apply(lm):
            result.columns[title] = generate(lm, questions, max_new_tokens=max_new_tokens)
    step("judging")
    for title, replies in result.columns.items():
        result.scores[title] = [persona.towards(s) for s in judge.score(replies)]
    return result


def _score_chart(result: DemoResult) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = list(result.columns)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    ax.bar(titles, [result.mean_score(t) for t in titles], color=["#999"] + ["#3a7"] * (len(titles) - 1))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylim(-1, 1)
    ax.set_ylabel("judge score towards persona")
    ax.set_title(f"Persona {result.persona.spec()}: mean over the {len(result.questions)} replies")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _effect_text(effect: Effect) -> str:
    return f"{effect.describe('+.2f')} {effect.verdict}"


def render_demo_html(result: DemoResult, model_spec: str) -> str:
    titles = list(result.columns)
    head = "".join(f"<th>{html.escape(t)}<br><small>mean score {result.mean_score(t):+.2f}"
                   + (f"<br>effect {_effect_text(result.effect(t))}" if result.effect(t) else "")
                   + (f" · fit {result.fit_seconds[t]:.0f} s" if t in result.fit_seconds else "") + "</small></th>"
                   for t in titles)
    rows = "".join(
        f"<tr><td><b>{html.escape(q)}</b></td>"
        + "".join(f"<td>{html.escape(result.columns[t][i])}<br><small>score {result.scores[t][i]:+.2f}</small></td>"
                  for t in titles)
        + "</tr>"
        for i, q in enumerate(result.questions))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>personaedit demo · {html.escape(result.persona.spec())}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:5px 8px;vertical-align:top;font-size:14px}}
small{{color:#666}}</style></head><body>
<h1>personaedit demo</h1>
<p>Model <b>{html.escape(model_spec)}</b>, persona <b>{html.escape(result.persona.spec())}</b>, held-out (test split)
questions, greedy decoding. Scores: the offline text judge, signed towards the persona (−1 … +1).</p>
<img alt="scores" src="data:image/png;base64,{_score_chart(result)}">
<table><tr><th>question</th>{head}</tr>{rows}</table>
</body></html>
"""


def write_demo_html(result: DemoResult, model_spec: str, path: str | Path) -> Path:
    write_text_atomic(path, render_demo_html(result, model_spec))
    return Path(path)
