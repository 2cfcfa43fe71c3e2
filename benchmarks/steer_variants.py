"""Steer variants outside calibrate's search space, on the same validation questions and budget readings.

python benchmarks/steer_variants.py --persona extraversion=high \
    --variants '[{"layer": "13-25", "prompt_too": true, "equal_norms": true}]' --strengths 0.5,0.75,1

Each variant (fit options) is fitted once and applied at each strength; printed: the paired judge effect towards the
persona with its 95% interval, the coherent share and the perplexity ratio, as `personaedit calibrate` reports them
(nothing is cached or chosen). Only validation questions are used.
"""

from __future__ import annotations

import argparse
import json

from personaedit import calibration
from personaedit.eval.text_judge import TextJudge
from personaedit.models import load_model
from personaedit.persona import Persona


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--persona", default="extraversion=high")
    parser.add_argument("--variants", required=True, help="JSON list of steer fit options")
    parser.add_argument("--strengths", default="0.5,0.75,1")
    args = parser.parse_args()
    variants = json.loads(args.variants)
    strengths = [float(s) for s in args.strengths.split(",")]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        parser.error("--variants must be a JSON list of objects")
    calibration.search_space = lambda method, lm: (variants, strengths)  # this run's settings, not calibrate's
    lm, judge = load_model(args.model), TextJudge.load()
    result = calibration.calibrate(lm, "steer", Persona.parse(args.persona), judge, use_cache=False,
                                   stage=lambda s: print(f"  {s}", flush=True))
    for t in result["trials"]:
        e = t["effect"]
        print(f"{json.dumps(t['options'])} at {t['strength']:g}: {e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] "
              f"coherent {t['coherent_share']:.0%} perplexity × {t['perplexity_ratio']:.2f}", flush=True)


if __name__ == "__main__":
    main()
