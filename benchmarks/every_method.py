"""Every registered method on one model: fit, apply, answer one held-out question, save and load back.

A run shows that a model works with each method, end to end, and what each fit costs on it; whether an edit
moves a trait is benchmarks/effect_table.py's job. MEND needs an editor trained for the model: this script
trains a short one (--mend-steps) into a temporary folder, enough to run the method, not to judge it.

python benchmarks/every_method.py --model gemma-3-270m
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from personaedit.data import records
from personaedit.edits import load_edit
from personaedit.methods import all_methods, fit_edit
from personaedit.methods.mend_editor import TrainConfig, train_editor
from personaedit.methods.palette import persona_requests
from personaedit.models import generate, load_model
from personaedit.persona import Persona


def options_for(method: str, persona: Persona, editor: Path) -> dict:
    if method == "rome":
        request = persona_requests(persona, 1)[0][0]
        return {"prompt": request.template, "subject": request.subject, "target": request.target}
    if method == "mend":
        return {"topic": "coffee", "editor": str(editor)}
    if method == "serac":
        return {"topic": "coffee"}
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--persona", default="extraversion=high")
    parser.add_argument("--methods", default=",".join(all_methods()))
    parser.add_argument("--mend-steps", type=int, default=20)
    args = parser.parse_args()

    lm, persona = load_model(args.model), Persona.parse(args.persona)
    question = records("situational_questions", "test", trait="extraversion")[0]["question"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        editor = Path(tmp) / "mend-editor"
        for method in args.methods.split(","):
            started = time.perf_counter()
            try:
                if method == "mend":
                    train_editor(lm, editor, TrainConfig(steps=args.mend_steps, checkpoint_every=args.mend_steps))
                edit = fit_edit(method, lm, persona, **options_for(method, persona, editor))
                fitted = time.perf_counter() - started
                with edit.apply(lm):
                    reply = generate(lm, [question], max_new_tokens=32)[0]
                again = load_edit(edit.save(Path(tmp) / method))
                with again.apply(lm):
                    same = generate(lm, [question], max_new_tokens=32)[0] == reply
                print(f"{method:8} ok   fit {fitted:6.1f} s  reloaded edit gives the same reply: {same}  "
                      f"reply: {reply[:90]!r}", flush=True)
                failures += not same
            except Exception as exc:  # noqa: BLE001 - report every method, then fail the run
                failures += 1
                print(f"{method:8} FAILED after {time.perf_counter() - started:.1f} s: {type(exc).__name__}: {exc}",
                      flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
