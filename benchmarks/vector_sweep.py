"""Personality vectors on the default model: train (or reuse) one vector per persona, then measure the
judged trait of greedy replies to held-out questions (test-split situational questions of the vectors'
traits + test-split neutral questions) over an α sweep of the first vector, negation (α = −1) of each,
and the two-vector composition (plain sum via ComposedEdit; TIES and DARE per tensor when
personaedit.merge is installed).

Results are kept in WORK/results.json per condition, so an interrupted run picks up where it stopped
(vector training resumes from its checkpoints). Run:
OMP_NUM_THREADS=1 nice -n 10 python benchmarks/vector_sweep.py --work /tmp/vector-sweep \
    --persona extraversion=high --persona neuroticism=high
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from personaedit.data import records
from personaedit.edits import BaseModelInfo, ComposedEdit, Delta, Edit, WeightEdit
from personaedit.eval.metrics import is_coherent
from personaedit.eval.text_judge import TextJudge
from personaedit.fileio import write_json_atomic
from personaedit.models import LoadedModel, generate, load_model
from personaedit.persona import Persona
from personaedit.vectors import train_vector


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def held_out(personas: list[Persona]) -> list[str]:
    traits = [name for p in personas for name, _ in p.levels]
    rows = [r for t in traits for r in records("situational_questions", "test", trait=t)]
    return [r["question"] for r in rows + records("neutral_questions", "test")]


def merged(method: str, edits: list[WeightEdit], weights: list[float], lm: LoadedModel, **knobs: float) -> WeightEdit:
    """Two vectors merged tensor by tensor with personaedit.merge's method, as one dense weight edit."""
    from personaedit.merge.methods import MergeOptions, merge_deltas

    options = MergeOptions(**knobs)
    names = sorted(set().union(*(e.deltas for e in edits)))
    deltas = {}
    for name in names:
        shape = next(e.deltas[name].shape for e in edits if name in e.deltas)
        parts = [e.deltas[name].materialise(torch.device("cpu")) if name in e.deltas else torch.zeros(shape) for e in edits]
        deltas[name] = Delta(dense=merge_deltas(method, parts, weights, options, name))
    return WeightEdit(method=f"vector-{method}", options={"weights": weights, **knobs}, base=BaseModelInfo.of(lm), deltas=deltas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vector-sweep"))
    parser.add_argument("--persona", action="append", default=[], help="repeat; the first is swept")
    parser.add_argument("--alphas", default="0,0.5,1,1.5,2")
    parser.add_argument("--weight", type=float, default=1.0, help="each vector's weight in the composition")
    parser.add_argument("--limit", type=int, default=64, help="training questions per vector (0: all)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: train_vector's)")
    parser.add_argument("--gen-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    personas = [Persona.parse(p) for p in (args.persona or ["extraversion=high", "neuroticism=high"])]
    traits = [p.levels[0][0] for p in personas]
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    lm, judge = load_model("default"), TextJudge.load()
    vectors: list[WeightEdit] = []
    for persona in personas:
        folder = args.work / re.sub(r"[^a-z0-9]+", "-", persona.spec().lower())
        start = time.perf_counter()
        trained = train_vector(lm, persona, folder, limit=args.limit, epochs=args.epochs, learning_rate=args.lr,
                               on_progress=lambda stage, done, total: log(f"{persona.spec()} {stage} {done}/{total}"))
        key = f"train {persona.spec()}"
        if trained.resumed_from == 0 or key not in results:
            results[key] = {"wall_s": time.perf_counter() - start, "train_s": trained.seconds, "examples": trained.examples,
                            "steps": trained.steps, "resumed_from": trained.resumed_from, "loss": trained.train_loss}
            write_json_atomic(results_path, results)
        log(f"{key}: {results[key]}")
        vectors.append(trained.edit)
        del trained

    questions = held_out(personas)
    log(f"{len(questions)} held-out questions")

    def measure(label: str, edit: Edit | None, strength: float = 1.0) -> dict:
        if label not in results:
            start = time.perf_counter()
            if edit is None:
                replies = generate(lm, questions, max_new_tokens=args.gen_tokens)
            else:
                with edit.apply(lm, strength):
                    replies = generate(lm, questions, max_new_tokens=args.gen_tokens)
            scores = judge.score(replies)
            results[label] = {
                "scores": {t: float(np.mean([s[t] for s in scores])) for t in traits},
                "coherent": float(np.mean([is_coherent(r) for r in replies])),
                "seconds": time.perf_counter() - start, "sample_reply": replies[0],
            }
            write_json_atomic(results_path, results)
        row = results[label]
        log(f"{label:<34} " + "  ".join(f"{t} {row['scores'][t]:+.3f}" for t in traits) + f"  coherent {row['coherent']:.0%}")
        return row

    alphas = [float(a) for a in args.alphas.split(",")]
    first, second = personas[0].spec(), personas[-1].spec()
    for alpha in alphas:
        measure("base" if alpha == 0 else f"{first} α={alpha:g}", None if alpha == 0 else vectors[0], alpha)
    measure(f"{first} α=-1", vectors[0], -1.0)
    if len(vectors) > 1:
        measure(f"{second} α=1", vectors[1], 1.0)
        measure(f"{second} α=-1", vectors[1], -1.0)
        w = [args.weight, args.weight]
        measure(f"sum {w[0]:g}·φ1 + {w[1]:g}·φ2", ComposedEdit.of(*vectors, weights=w))
        if importlib.util.find_spec("personaedit.merge") is None:
            log("personaedit.merge not installed: no TIES/DARE rows")
        else:
            measure(f"ties density 0.3, {w[0]:g} each", merged("ties", vectors, w, lm, density=0.3))
            measure(f"dare_linear drop 0.5, {w[0]:g} each", merged("dare_linear", vectors, w, lm, drop=0.5, seed=0))

    print(f"\nα sweep of {first} ({len(questions)} held-out questions, greedy, {args.gen_tokens} tokens; judge score in [-1, 1])")
    print(f"{'condition':<36}" + "".join(f"{t:>18}" for t in traits) + f"{'coherent':>10}")
    for label, row in results.items():
        if "scores" in row:
            print(f"{label:<36}" + "".join(f"{row['scores'][t]:>+18.3f}" for t in traits) + f"{row['coherent']:>10.0%}")
    rows = [results["base" if a == 0 else f"{first} α={a:g}"] for a in alphas]
    ys = [r["scores"][traits[0]] for r in rows]
    print(f"\nPearson(α, {traits[0]} score) over α = {args.alphas}: {np.corrcoef(alphas, ys)[0, 1]:+.3f}")
    kept = [(a, y) for a, y, r in zip(alphas, ys, rows) if r["coherent"] >= 0.8]
    if len(kept) >= 3:
        xs, ks = zip(*kept)
        print(f"  over the α with ≥ 80% coherent replies ({', '.join(f'{a:g}' for a in xs)}): {np.corrcoef(xs, ks)[0, 1]:+.3f}")
    for key, row in results.items():
        if key.startswith("train "):
            print(f"{key}: {row['examples']} examples, {row['steps']} steps, training {row['train_s']:.0f} s, "
                  f"with distillation {row['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
