"""Search for settings under which npti and dpnle control a trait on the default model.

Scored on the VALIDATION questions (20 situational + 12 neutral, greedy, 40 new tokens), never on
the test questions the bench reports: this is where defaults may be chosen.

  run dpnle  --traits T1,T2 --layers 7-11,12-16 --strengths -2,-1,1,2   dpnle fitted on a layer range
  run npti   --personas extraversion=low,... --shares 0.005,0.02 --strengths 2,4
  report                                                                 judge every reply, print the table

`run` appends one JSON line per condition (replies and perplexity on 8 validation paragraphs) to
--rows (default runs/activation_settings.jsonl); a base row is written once. `report` prints the judged
score of the targeted trait per strength (base at 0), perplexity and the share of coherent replies,
and Spearman between strength and score.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from collections import defaultdict
from pathlib import Path

import torch

from personaedit.data import records
from personaedit.eval import metrics
from personaedit.eval.text_judge import TextJudge
from personaedit.methods import dpnle, fit_edit
from personaedit.methods.capture import capture
from personaedit.models import generate, load_model
from personaedit.persona import BIG_FIVE


@functools.cache
def validation_prompts() -> tuple[list[str], list[str]]:
    questions = [r["question"] for t in BIG_FIVE for r in records("situational_questions", "validation", trait=t)]
    questions += [r["question"] for r in records("neutral_questions", "validation")]
    return questions, [r["text"] for r in records("neutral_text", "validation")][:8]


def reuse_middle_capture(lm) -> None:
    """Fit dpnle on sub-ranges of the middle half from one (cached) capture of the whole middle half.

    Slicing gives the same activations as capturing the sub-range, without recollecting 2,000 prompts."""
    middle = [("mlp_hidden", layer) for layer in lm.arch.middle_layers(0.25, 0.75)]
    kept: dict[int, dict] = {}

    def capture_pairs(lm_, data, sites, **options):
        sides = []
        for prompts in (data.high, data.low):
            key = hash(tuple(prompts))
            if key not in kept:
                kept[key] = capture(lm_, prompts, sorted(set(middle) | set(sites)), batch_size=16)
            sides.append({site: kept[key][site] for site in sites})
        return tuple(sides)

    dpnle.capture_pairs = capture_pairs


def measure(lm, rows: Path, tag: dict, edit, strength: float) -> None:
    questions, paragraphs = validation_prompts()
    applied = edit.apply(lm, strength) if edit is not None and strength != 0 else contextlib.nullcontext()
    with applied:
        replies = generate(lm, questions, max_new_tokens=40, batch_size=32)
        ppl = metrics.perplexity(lm, paragraphs)
    with rows.open("a") as fh:
        fh.write(json.dumps(dict(tag, strength=strength, greedy=replies, ppl=ppl)) + "\n")
    print(tag.get("persona", "base"), tag.get("variant", ""), strength, f"ppl {ppl:.1f}", flush=True)


def run(args: argparse.Namespace) -> None:
    lm = load_model("default")
    rows = Path(args.rows)
    rows.parent.mkdir(parents=True, exist_ok=True)
    if not rows.exists() or not any(json.loads(line)["method"] == "base" for line in rows.open()):
        measure(lm, rows, {"method": "base"}, None, 0)
    strengths = [float(s) for s in args.strengths.split(",")]
    if args.method == "dpnle":
        reuse_middle_capture(lm)
        for trait in args.traits.split(","):
            for layers in args.layers.split(","):
                edit = fit_edit("dpnle", lm, f"{trait}=high", layers=layers)
                for s in strengths:
                    measure(lm, rows, {"method": "dpnle", "persona": f"{trait}=high", "variant": layers}, edit, s)
    else:
        for persona in args.personas.split(","):
            for share in (float(x) for x in args.shares.split(",")):
                edit = fit_edit("npti", lm, persona, top_share=share)
                for s in strengths:
                    measure(lm, rows, {"method": "npti", "persona": persona, "variant": f"share {share}"}, edit, s)


def report(args: argparse.Namespace) -> None:
    judge = TextJudge.load()
    rows = [json.loads(line) for line in Path(args.rows).open()]
    base = next(r for r in rows if r["method"] == "base")

    def judged(row: dict) -> tuple[dict[str, float], float]:
        scores = judge.score(row["greedy"])
        mean = {t: sum(s[t] for s in scores) / len(scores) for t in scores[0]}
        return mean, sum(map(metrics.is_coherent, row["greedy"])) / len(row["greedy"])

    base_scores, base_coherent = judged(base)
    groups: dict[tuple, dict[float, dict]] = defaultdict(dict)
    for row in rows:
        if row["method"] != "base":
            groups[(row["method"], row["persona"], row["variant"])][row["strength"]] = row
    print("base (validation): " + ", ".join(f"{t} {base_scores[t]:+.2f}" for t in BIG_FIVE)
          + f"; perplexity {base['ppl']:.1f}")
    print("| method | persona | setting | strength: trait score / perplexity / coherent | Spearman |")
    print("|---|---|---|---|---|")
    for (method, persona, variant), by_strength in sorted(groups.items()):
        trait = persona.split("=")[0]
        points = {0.0: (base_scores[trait], base["ppl"], base_coherent)}
        for s, row in by_strength.items():
            scores, coherent = judged(row)
            points[s] = (scores[trait], row["ppl"], coherent)
        order = sorted(points)
        cells = "; ".join(f"{s:+g}: {points[s][0]:+.2f} / {points[s][1]:.0f} / {points[s][2]:.0%}" for s in order)
        rho = metrics.spearman(order, [points[s][0] for s in order])
        print(f"| {method} | {persona} | {variant} | {cells} | {rho:+.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["run", "report"])
    parser.add_argument("method", nargs="?", choices=["dpnle", "npti"])
    parser.add_argument("--rows", default="runs/activation_settings.jsonl")
    parser.add_argument("--traits", default=",".join(BIG_FIVE))
    parser.add_argument("--layers", default="7-11,12-16,17-21")
    parser.add_argument("--personas", default=",".join(f"{t}={p}" for t in BIG_FIVE for p in ("high", "low")))
    parser.add_argument("--shares", default="0.005,0.02")
    parser.add_argument("--strengths", default="-2,-1,1,2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "run":
        if args.method is None:
            parser.error("run needs a method: dpnle or npti")
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
