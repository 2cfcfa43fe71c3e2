"""How strongly steering shows in generated text: the judge's score of the steered trait in greedy
replies to that trait's validation (+ 8 training) situational questions, over raw-vector multiples.

This produced the calibration quoted in methods/steer.py (extraversion: -0.33 at 0, +0.29 at 8x,
+0.55 at 16x, all replies coherent). Run:
python benchmarks/steer_calibration.py extraversion steer -16,-8,0,8,16
"""

from __future__ import annotations

import sys

from personaedit.data import records
from personaedit.eval.metrics import is_coherent
from personaedit.eval.text_judge import TextJudge
from personaedit.methods import fit_edit
from personaedit.models import generate, load_model


def main() -> None:
    trait, method = sys.argv[1], sys.argv[2]
    strengths = [float(x) for x in sys.argv[3].split(",")]
    lm, judge = load_model("default"), TextJudge.load()
    questions = [r["question"] for r in records("situational_questions", "validation", trait=trait)]
    questions += [r["question"] for r in records("situational_questions", "train", trait=trait)][:8]
    options = {"min_d": 0.5} if method == "dpnle" else {"scale": 1.0} if method == "steer" else {}
    edit = fit_edit(method, lm, f"{trait}=high", pairs=128, **options)
    for strength in strengths:
        with edit.apply(lm, strength):
            replies = generate(lm, questions, max_new_tokens=40)
        scores = [s[trait] for s in judge.score(replies)]
        coherent = sum(map(is_coherent, replies)) / len(replies)
        print(f"{method} {strength:+.0f}x  {trait} {sum(scores) / len(scores):+.3f}  coherent {coherent:.0%}", flush=True)


if __name__ == "__main__":
    main()
