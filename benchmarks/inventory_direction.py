"""Does a persona prompt move the inventory self-report in its direction, on the default model?

For each Big Five trait, the model answers the trait's 24 IPIP-NEO-120 items under a system prompt for the
high pole and again for the low pole (the PROMPT method), with each scoring of `eval/inventory.py`. The
effect is the paired per-item difference high − low (1–5 scale) with its 95% bootstrap interval; the
verdict is read from the interval (eval/effect.py).

python benchmarks/inventory_direction.py [--model default] [--scorings agreement,letters]
"""

from __future__ import annotations

import argparse
import time

import torch

from personaedit.eval import inventory as inv
from personaedit.eval.effect import paired_effect
from personaedit.methods.prompt import prompt_edit
from personaedit.models import load_model
from personaedit.persona import BIG_FIVE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--scorings", default=",".join(inv.SCORINGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model)
    began = time.perf_counter()
    print("| scoring | trait | high-pole prompt (mean 1–5) | low-pole prompt | high − low per item [95% interval] | verdict |")
    print("|---|---|---|---|---|---|")
    for scoring in args.scorings.split(","):
        for trait in BIG_FIVE:
            items = {}
            for level in ("high", "low"):
                with prompt_edit(f"{trait}={level}").apply(lm):
                    items[level] = inv.run_inventory(lm, traits=[trait], mbti=False, scoring=scoring).items
            high = [r["expected"] for r in items["high"]]
            low = [r["expected"] for r in items["low"]]
            effect = paired_effect(low, high)
            print(f"| {scoring} | {trait} | {sum(high) / len(high):.2f} | {sum(low) / len(low):.2f} | "
                  f"{effect.describe('+.2f')} (n={effect.n}) | {effect.verdict} |", flush=True)
    print(f"\n{time.perf_counter() - began:.0f} s; model {args.model}; one torch thread")


if __name__ == "__main__":
    main()
