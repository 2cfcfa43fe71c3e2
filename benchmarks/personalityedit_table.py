"""The PersonalityEdit table: ES, DD, Acc, TPEI (PAE needs an LLM judge) of PROMPT, IKE, MEND and SERAC on
the test split of the project's opinions, plus SERAC's out-of-scope answers against the base model's.

For each test topic (the first --topics in sorted order) and target trait in {extraversion, agreeableness,
neuroticism} (high pole, as in PersonalityEdit) each method fits an edit with the descriptor (topic, trait):
- ES: the topic's target-trait opinion vs its other two traits' opinions, asked with the three paraphrased
  question templates (MEND's edit example uses the fourth, "What do you think of {}?").
- DD: KL(base ‖ edited) over the answer tokens of 4 opinions on the next two test topics (outer scope).
- Acc / TPEI: greedy replies (60 tokens, first line) to the three paraphrased questions, classified by the
  text judge's 5-way trait head; coherent pairs only (n-gram entropy ≥ 3.5 for base and edited).
- SERAC out of scope: replies to the outer topics' questions with and without the edit, compared exactly.
MEND needs a trained editor (`personaedit mend train --model default`), read from the cache or --editor.

python benchmarks/personalityedit_table.py --topics 4
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

from personaedit.data import records
from personaedit.data.external import PERSONALITYEDIT_TRAITS
from personaedit.eval.metrics import accuracy, coherent_pairs, first_line, measure_dd, measure_es, tpei
from personaedit.eval.text_judge import TRAITS, TextJudge
from personaedit.methods import fit_edit
from personaedit.data.external import EDIT_QUESTION, PARAPHRASES
from personaedit.models import generate, load_model

METHODS = ("prompt", "ike", "mend", "serac")


def opinion(topic: str, trait: str, pole: str = "high") -> str:
    return records("opinions", "test", topic=topic, trait=trait, pole=pole)[0]["text"]


def replies(lm, questions: list[str]) -> list[str]:
    return [first_line(t) for t in generate(lm, questions, max_new_tokens=60)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--topics", type=int, default=4, help="test topics used (of 10), in sorted order")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--editor", default=None, help="MEND editor folder (default: the cache)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    lm, judge = load_model(args.model), TextJudge.load()
    all_topics = sorted({r["topic"] for r in records("opinions", "test")})
    topics = all_topics[: args.topics]
    began = time.perf_counter()

    base_inner = {t: replies(lm, [q.format(t) for q in PARAPHRASES]) for t in topics}
    outer_of = {t: [all_topics[(all_topics.index(t) + k) % len(all_topics)] for k in (1, 2)] for t in topics}
    outer_questions = {t: [EDIT_QUESTION.format(o) for o in outer_of[t]] for t in topics}
    base_outer = {t: replies(lm, outer_questions[t]) for t in topics}

    rows = {m: {"es": [], "dd": [], "base": [], "edited": [], "target": [], "fit_s": [], "same": 0, "outer": 0}
            for m in methods}
    for topic in topics:
        outer = [(EDIT_QUESTION.format(o), opinion(o, trait)) for o in outer_of[topic] for trait in ("extraversion", "neuroticism")]
        for trait in PERSONALITYEDIT_TRAITS:
            target = [(q.format(topic), opinion(topic, trait)) for q in PARAPHRASES]
            other = [(q.format(topic), opinion(topic, t)) for q in PARAPHRASES for t in PERSONALITYEDIT_TRAITS if t != trait]
            for name in methods:
                options = {"topic": topic} if name in ("mend", "serac") else {}
                if name == "mend" and args.editor:
                    options["editor"] = args.editor
                start = time.perf_counter()
                edit = fit_edit(name, lm, f"{trait}=high", **options)
                row = rows[name]
                row["fit_s"].append(time.perf_counter() - start)
                row["es"].append(measure_es(lm, edit, target, other))
                row["dd"].append(measure_dd(lm, edit, outer))
                with edit.apply(lm):
                    row["edited"] += replies(lm, [q for q, _ in target])
                    if name == "serac":
                        edited_outer = replies(lm, outer_questions[topic])
                        row["same"] += sum(a == b for a, b in zip(edited_outer, base_outer[topic]))
                        row["outer"] += len(edited_outer)
                row["base"] += base_inner[topic]
                row["target"] += [TRAITS.index(trait)] * len(target)
                print(f"{topic} / {trait} / {name}: ES {row['es'][-1]:.3f} DD {row['dd'][-1]:.4f} "
                      f"({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)

    lines = ["| method | ES | DD | Acc | TPEI | PAE | coherent pairs | fit s / edit |", "|---|---|---|---|---|---|---|---|"]
    for name in methods:
        row = rows[name]
        keep = coherent_pairs(row["base"], row["edited"])
        acc = tp = math.nan
        if keep:
            base_p = judge.trait_probabilities([row["base"][i] for i in keep])
            edited_p = judge.trait_probabilities([row["edited"][i] for i in keep])
            targets = [row["target"][i] for i in keep]
            acc, tp = accuracy(edited_p, targets), tpei(base_p, edited_p, targets)
        lines.append(f"| {name.upper()} | {np.mean(row['es']):.3f} | {np.mean(row['dd']):.4f} | {acc:.1%} | {tp:+.3f} | "
                     f"n/a (no LLM endpoint) | {len(keep)}/{len(row['base'])} | {np.mean(row['fit_s']):.2f} |")
    if "serac" in rows:
        serac = rows["serac"]
        lines.append("")
        lines.append(f"SERAC out of scope: {serac['same']}/{serac['outer']} replies to outer-topic questions identical to the base model's.")
    command = f"python benchmarks/personalityedit_table.py --topics {args.topics}" + (f" --methods {args.methods}" if args.methods != ",".join(METHODS) else "")
    header = (f"{len(topics)} test topics ({', '.join(topics)}) × 3 target traits = {len(topics) * 3} edits per method; "
              f"{time.perf_counter() - began:.0f} s in all. Command: `{command}`")
    table = "\n".join([header, "", *lines])
    print(table)


if __name__ == "__main__":
    main()
