"""PALETTE on the default model: efficacy, specificity, trait shift, robustness, ablations and costs.

main      for each persona (default: both poles of the five Big Five traits and of T/F): fit PALETTE
          (12 queries), then
          - efficacy: the target is the greedy continuation of its edited query; the same for the
            query's paraphrase (never used to edit) and for the pole's 4 queries not used to edit;
          - specificity: perplexity on the test split of neutral_text, KL(base ‖ edited) of the next
            token after the test split's neutral questions (chat prompts);
          - trait: the text judge's score of the persona's dimension in greedy replies (32 tokens) to the
            20 held-out (test-split) situational questions, base vs edited;
          - robustness (--robust personas): the same replies under a system prompt asking for the
            opposite pole, PALETTE-edited vs prompt-edited (the PROMPT method) model;
          - costs: seconds per query edit and peak resident memory while fitting (sampled every 20 ms).
ablation  one persona, PALETTE at three layers with 16 queries each; the edits with the first 4/8/12/16
          queries are prefixes of that sequence (sequential editing), so each layer is fitted once.
noise     the standard error of the base model's judge means over the held-out questions (sd / √20).
stats     MEMIT second-moment statistics: seconds per 1,000 samples (tokens), computed without the cache.
costs     in a process holding only the model: one r-ROME edit and PALETTE per query (time, peak memory),
          and MEMIT on the same queries (time, efficacy).
specificity  efficacy on the used queries and perplexity rise on the validation paragraphs under other
          palette options (--settings), to see what lowers the perplexity cost.
rescore   scores the replies the JSON files keep with the current judge (FILE.rescored.json).
report    prints the tables of docs/BENCHMARKS.md from the JSON files written with --json.

Run (each part can run in its own process; results are also written as JSON with --json):
  python benchmarks/palette_edit.py main --personas extraversion=high,tf=T --robust tf=T
  python benchmarks/palette_edit.py ablation --persona tf=T --layers 8,16,24
  python benchmarks/palette_edit.py stats --samples 5000 --layers 12,13,14,15,16
  python benchmarks/palette_edit.py costs --persona tf=T --queries 4
  python benchmarks/palette_edit.py report main.json ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import row  # noqa: E402

from personaedit.data import records  # noqa: E402
from personaedit.edits import WeightEdit  # noqa: E402
from personaedit.eval.metrics import kl_to_base, perplexity
from personaedit.models.scoring import next_token_logprobs  # noqa: E402
from personaedit.eval.text_judge import TextJudge  # noqa: E402
from personaedit.methods import fit_edit  # noqa: E402
from personaedit.methods.locate import Request, efficacy  # noqa: E402
from personaedit.methods.second_moment import second_moments  # noqa: E402
from personaedit.models import generate, load_model  # noqa: E402
from personaedit.persona import Persona, describe  # noqa: E402
from personaedit.edits import Delta  # noqa: E402

DEFAULT_PERSONAS = [f"{t}={p}" for t in ("openness", "conscientiousness", "extraversion", "agreeableness",
                                          "neuroticism") for p in ("high", "low")] + ["tf=T", "tf=F"]


class PeakMemory:
    """Peak resident set size of this process while the block runs (sampled)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        process = psutil.Process()
        self.peak = process.memory_info().rss

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(self.every)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def held_out_questions() -> list[str]:
    """The 20 test-split situational questions (4 per Big Five trait)."""
    return [r["question"] for r in records("situational_questions", "test")]


def pole_queries(persona: Persona) -> tuple[list[Request], list[Request]]:
    """All 16 queries of the persona's pole and their paraphrases, in file order."""
    (dim,), ((_, level),) = persona.dimensions(), persona.levels
    rows = records("palette_queries", dimension=dim.name, pole=dim.pole(level).name)
    queries = [Request.of(r["template"], r["subject"], r["target"]) for r in rows]
    paraphrases = [Request.of(r["paraphrase"], r["subject"], r["target"]) for r in rows]
    return queries, paraphrases


def save(path: Path | None, results: dict) -> None:
    """Results so far (a long run that is cut short keeps what it measured)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def efficacy_rates(lm, persona: Persona, used: int) -> dict[str, float]:
    queries, paraphrases = pole_queries(persona)
    hits, para = efficacy(lm, queries), efficacy(lm, paraphrases)
    return {"edited": rate(hits[:used]), "paraphrase": rate(para[:used]),
            "held_out_queries": rate(hits[used:]), "held_out_paraphrases": rate(para[used:])}


def trait_score(judge: TextJudge, replies: list[str], dimension: str) -> float:
    return statistics.fmean(s[dimension] for s in judge.score(replies))


def replies(lm, questions: list[str], max_new_tokens: int, system: str | None = None) -> list[str]:
    return generate(lm, questions, max_new_tokens=max_new_tokens, system=system)


def judge_version(judge: TextJudge) -> str:
    """The judge's encoder (the results keep the replies, so `rescore` can score them with another judge)."""
    return str(judge.head.metadata.get("encoder", "sentence-transformers/all-MiniLM-L6-v2"))


def run_main(args) -> dict:
    lm, judge = load_model("default"), TextJudge.load()
    questions = held_out_questions()
    neutral = [r["text"] for r in records("neutral_text", "test")]
    kl_prompts = [r["question"] for r in records("neutral_questions", "test")]
    base_ppl = perplexity(lm, neutral)
    base_next = next_token_logprobs(lm, kl_prompts)
    base_replies = replies(lm, questions, args.max_new_tokens)
    base_scores = judge.score(base_replies)
    robust = set(filter(None, args.robust.split(",")))
    results = {"base_perplexity": base_ppl, "questions": len(questions), "judge": judge_version(judge),
               "replies_base": base_replies, "personas": {}}
    for spec in filter(None, args.personas.split(",")):
        persona = Persona.parse(spec)
        dim, level = persona.dimensions()[0], persona.levels[0][1]
        base_eff = efficacy_rates(lm, persona, args.queries)
        start = time.perf_counter()
        with PeakMemory() as memory:
            edit = fit_edit("palette", lm, persona, queries=args.queries, protect=args.protect == "on",
                            **({"layer": args.layer} if args.layer is not None else {}))
        seconds = time.perf_counter() - start
        with edit.apply(lm):
            eff = efficacy_rates(lm, persona, args.queries)
            ppl = perplexity(lm, neutral)
            kl = kl_to_base(base_next, next_token_logprobs(lm, kl_prompts))
            edited_replies = replies(lm, questions, args.max_new_tokens)
        edited_score = trait_score(judge, edited_replies, dim.name)
        base_score = statistics.fmean(s[dim.name] for s in base_scores)
        entry = {"seconds_per_query": seconds / args.queries, "peak_rss_mb": memory.peak / 2**20,
                 "efficacy_base": base_eff, "efficacy": eff, "perplexity": ppl, "perplexity_rise": ppl / base_ppl - 1,
                 "kl_neutral": kl, "score_base": base_score, "score_edited": edited_score,
                 "moved_toward_target": (edited_score - base_score) * (1 if level > 0 else -1) > 0,
                 "mean_steps": statistics.fmean(f["steps"] for f in edit.options["fitted"].values()),
                 "replies": {"edited": edited_replies}}
        if spec in robust:
            opposite = describe(persona.scaled(-1.0))
            with edit.apply(lm):
                texts = {"palette": replies(lm, questions, args.max_new_tokens, opposite)}
            with fit_edit("prompt", lm, persona).apply(lm):
                texts["prompt"] = replies(lm, questions, args.max_new_tokens, opposite)
            texts["base"] = replies(lm, questions, args.max_new_tokens, opposite)
            entry["robustness"] = {"opposite_system_prompt": opposite,
                                   **{k: trait_score(judge, v, dim.name) for k, v in texts.items()}}
            entry["replies"]["opposite_prompt"] = texts
        results["personas"][spec] = entry
        print(json.dumps({spec: {k: v for k, v in entry.items() if k != "replies"}}), flush=True)
        save(args.json, results)
    return results


def run_ablation(args) -> dict:
    lm, judge = load_model("default"), TextJudge.load()
    persona = Persona.parse(args.persona)
    dim, level = persona.dimensions()[0], persona.levels[0][1]
    questions = held_out_questions()
    queries, paraphrases = pole_queries(persona)
    base_replies = replies(lm, questions, args.max_new_tokens)
    base_score = trait_score(judge, base_replies, dim.name)
    base_hits, base_para = efficacy(lm, queries), efficacy(lm, paraphrases)
    results = {"persona": args.persona, "score_base": base_score, "judge": judge_version(judge),
               "replies_base": base_replies, "cells": {},
               "base": {count: {"edited": rate(base_hits[:count]), "paraphrase_all16": rate(base_para),
                                "held_out_queries": rate(base_hits[count:])} for count in (4, 8, 12, 16)}}
    for layer in (int(x) for x in args.layers.split(",")):
        start = time.perf_counter()
        full = fit_edit("palette", lm, persona, queries=16, layer=layer, protect=args.protect == "on")
        seconds = (time.perf_counter() - start) / 16
        (name, delta), = full.deltas.items()
        for count in (4, 8, 12, 16):
            part = WeightEdit(method="palette", persona=persona,
                              deltas={name: Delta(u=delta.u[:, :count], v=delta.v[:, :count])})
            with part.apply(lm):
                hits, para = efficacy(lm, queries), efficacy(lm, paraphrases)
                texts = replies(lm, questions, args.max_new_tokens)
            score = trait_score(judge, texts, dim.name)
            cell = {"edited": rate(hits[:count]), "paraphrase_all16": rate(para),
                    "held_out_queries": rate(hits[count:]), "score": score,
                    "shift_toward_target": (score - base_score) * (1 if level > 0 else -1),
                    "seconds_per_query": seconds}
            print(json.dumps({f"layer {layer}, {count} queries": cell}), flush=True)
            results["cells"][f"{layer}/{count}"] = {**cell, "replies": texts}
            save(args.json, results)
    return results


def rescore(args) -> None:
    """Score the replies kept in JSON files (main, ablation) with the current judge; writes FILE.rescored.json."""
    judge = TextJudge.load()
    for path in args.files:
        data = json.loads(path.read_text())
        if "replies_base" not in data:
            raise SystemExit(f"{path} keeps no replies (written before replies were saved)")
        base = judge.score(data["replies_base"])
        if "cells" in data:
            dim = Persona.parse(data["persona"]).dimensions()[0].name
            sign = 1 if Persona.parse(data["persona"]).levels[0][1] > 0 else -1
            data["score_base"] = statistics.fmean(s[dim] for s in base)
            for cell in data["cells"].values():
                cell["score"] = trait_score(judge, cell["replies"], dim)
                cell["shift_toward_target"] = (cell["score"] - data["score_base"]) * sign
        for spec, entry in data.get("personas", {}).items():
            dim = Persona.parse(spec).dimensions()[0].name
            sign = 1 if Persona.parse(spec).levels[0][1] > 0 else -1
            entry["score_base"] = statistics.fmean(s[dim] for s in base)
            entry["score_edited"] = trait_score(judge, entry["replies"]["edited"], dim)
            entry["moved_toward_target"] = (entry["score_edited"] - entry["score_base"]) * sign > 0
            for key, texts in entry["replies"].get("opposite_prompt", {}).items():
                entry["robustness"][key] = trait_score(judge, texts, dim)
        data["judge"] = judge_version(judge)
        save(path.with_suffix(".rescored.json"), data)


def run_noise(args) -> dict:
    """How far a judge mean over the held-out questions moves on noise: the standard error (sd / √n) of
    the base model's per-question scores, per dimension."""
    lm, judge = load_model("default"), TextJudge.load()
    scores = judge.score(replies(lm, held_out_questions(), args.max_new_tokens))
    result = {}
    for dim in scores[0]:
        values = [s[dim] for s in scores]
        result[dim] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values),
                       "se": statistics.stdev(values) / len(values) ** 0.5}
        print(row(f"{dim}: mean / sd / standard error ({len(values)} questions)",
                  f"{result[dim]['mean']:+.2f} / {result[dim]['sd']:.2f} / {result[dim]['se']:.2f}", "-", None))
    return result


def run_specificity(args) -> dict:
    """Efficacy on the used queries and perplexity rise on the VALIDATION paragraphs, per setting
    (`--settings "kl_factor=0.5;clamp=2"`, `;`-separated, `,` between options; `default` = no change)."""
    lm = load_model("default")
    neutral = [r["text"] for r in records("neutral_text", "validation")]
    base_ppl = perplexity(lm, neutral)
    results = {"base_perplexity_validation": base_ppl, "rows": []}
    for spec in filter(None, args.personas.split(",")):
        persona = Persona.parse(spec)
        for setting in args.settings.split(";"):
            options = {} if setting == "default" else {
                k: float(v) for k, v in (item.split("=") for item in setting.split(","))}
            edit = fit_edit("palette", lm, persona, queries=args.queries, **options)
            with edit.apply(lm):
                eff = efficacy_rates(lm, persona, args.queries)
                ppl = perplexity(lm, neutral)
            entry = {"persona": spec, "setting": setting, "efficacy": eff["edited"],
                     "perplexity_rise": ppl / base_ppl - 1}
            results["rows"].append(entry)
            print(json.dumps(entry), flush=True)
            save(args.json, results)
    return results


def run_stats(args) -> dict:
    lm = load_model("default")
    layers = [int(x) for x in args.layers.split(",")]
    start = time.perf_counter()
    second_moments(lm, layers, args.samples, use_cache=False)
    seconds = time.perf_counter() - start
    result = {"layers": layers, "samples": args.samples, "seconds": seconds,
              "seconds_per_1000_samples": seconds / args.samples * 1000}
    print(row(f"second moments, {len(layers)} layers, {args.samples} tokens", f"{seconds:.1f} s", "-", None))
    print(row("per 1,000 samples", f"{result['seconds_per_1000_samples']:.2f} s", "-", None))
    return result


def run_costs(args) -> dict:
    """Time and peak memory of one r-ROME edit and of PALETTE per query, in a process holding only the model;
    MEMIT on the same queries for comparison (its statistics cached first, timed by `stats`)."""
    lm = load_model("default")
    persona = Persona.parse(args.persona)
    queries, paraphrases = pole_queries(persona)
    loaded = psutil.Process().memory_info().rss
    # One forward pass pages in the memory-mapped weights, so that the peaks below are above a model in use.
    with torch.no_grad():
        lm.model(input_ids=lm.tokenizer(["I usually"], return_tensors="pt")["input_ids"].to(lm.device), logits_to_keep=1)
    warm = psutil.Process().memory_info().rss
    load_before = os.getloadavg()
    first = queries[0]
    start = time.perf_counter()
    with PeakMemory() as rome_memory:
        rome = fit_edit("rome", lm, persona, prompt=first.template, subject=first.subject, target=first.target)
    rome_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with PeakMemory() as palette_memory:
        fit_edit("palette", lm, persona, queries=args.queries, protect=args.protect == "on")
    palette_seconds = (time.perf_counter() - start) / args.queries
    with rome.apply(lm):
        rome_hit = efficacy(lm, [first])[0]
    result = {"rss_after_load_mb": loaded / 2**20, "rss_after_one_forward_mb": warm / 2**20, "rome_seconds": rome_seconds, "rome_hit": rome_hit,
              "rome_peak_rss_mb": rome_memory.peak / 2**20, "palette_seconds_per_query": palette_seconds,
              "palette_peak_rss_mb": palette_memory.peak / 2**20, "threads": torch.get_num_threads(),
              "loadavg_before": load_before[0], "loadavg_after": os.getloadavg()[0]}
    if args.memit == "on":
        result.update(memit_costs(lm, persona, args))
    for key, value in result.items():
        print(row(key, f"{value:.3g}" if isinstance(value, float) else str(value), "-", None))
    return result


def memit_costs(lm, persona: Persona, args) -> dict:
    """MEMIT on the persona's first queries at layers 12-16 (statistics cached first): time and efficacy."""
    queries, paraphrases = pole_queries(persona)
    memit_layers = "12-16"
    second_moments(lm, range(12, 17), args.samples)
    start = time.perf_counter()
    memit = fit_edit("memit", lm, persona, queries=args.queries, layers=memit_layers, samples=args.samples)
    memit_seconds = time.perf_counter() - start
    with memit.apply(lm):
        hits, para = efficacy(lm, queries), efficacy(lm, paraphrases)
    return {"memit_seconds": memit_seconds, "memit_layers": memit_layers, "memit_edited": rate(hits[:args.queries]),
            "memit_paraphrase": rate(para[:args.queries]), "memit_held_out": rate(hits[args.queries:])}


def report(paths: list[Path]) -> None:
    """The tables of the docs from the JSON files the other parts wrote."""
    loaded = [json.loads(p.read_text()) for p in paths]
    print("judge: " + ", ".join(sorted({d.get("judge", "not recorded") for d in loaded})) + "\n")
    personas = {k: v for data in loaded for k, v in data.get("personas", {}).items()}
    if personas:
        print("| persona | s/query | peak RSS MB | efficacy | paraphrase | held-out queries | held-out paraphrases "
              "| ppl rise | KL neutral | judge base → edited |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for spec, e in personas.items():
            f, b = e["efficacy"], e["efficacy_base"]
            print(f"| {spec} | {e['seconds_per_query']:.1f} | {e['peak_rss_mb']:.0f} | {f['edited']:.2f} ({b['edited']:.2f}) "
                  f"| {f['paraphrase']:.2f} ({b['paraphrase']:.2f}) | {f['held_out_queries']:.2f} ({b['held_out_queries']:.2f}) "
                  f"| {f['held_out_paraphrases']:.2f} ({b['held_out_paraphrases']:.2f}) | {100 * e['perplexity_rise']:+.1f}% "
                  f"| {e['kl_neutral']:.4f} | {e['score_base']:+.2f} → {e['score_edited']:+.2f} "
                  f"{'✓' if e['moved_toward_target'] else '✗'} |")
        robust = {k: v["robustness"] for k, v in personas.items() if "robustness" in v}
        if robust:
            print("\n| persona | opposite prompt only | + PALETTE edit | + PROMPT edit | nearer the target |")
            print("|---|---|---|---|---|")
            for spec, r in robust.items():
                sign = 1 if Persona.parse(spec).levels[0][1] > 0 else -1
                margin = sign * (r["palette"] - r["prompt"])
                nearer = f"{'PALETTE' if margin > 0 else 'PROMPT'} by {abs(margin):.2f}"
                print(f"| {spec} | {r['base']:+.2f} | {r['palette']:+.2f} | {r['prompt']:+.2f} | {nearer} |")
    for data in loaded:
        if "cells" in data:
            print(f"\nablation {data['persona']} (judge base {data['score_base']:+.2f}): "
                  "efficacy / paraphrase (all 16) / held-out queries / judge score")
            layers = sorted({int(k.split("/")[0]) for k in data["cells"]})
            print("| queries | " + " | ".join(f"layer {l}" for l in layers) + " |")
            print("|---|" + "---|" * len(layers))
            for count in (4, 8, 12, 16):
                cells = [data["cells"][f"{l}/{count}"] for l in layers]
                print(f"| {count} | " + " | ".join(
                    f"{c['edited']:.2f} / {c['paraphrase_all16']:.2f} / {c['held_out_queries']:.2f} / {c['score']:+.2f}"
                    for c in cells) + " |")
            if "base" in data:
                print("base model: " + "; ".join(
                    f"{count} queries {b['edited']:.2f} / {b['paraphrase_all16']:.2f} / {b['held_out_queries']:.2f}"
                    for count, b in data["base"].items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["main", "ablation", "noise", "stats", "costs", "specificity", "report",
                                         "rescore"])
    parser.add_argument("files", nargs="*", type=Path, help="report: JSON files the other parts wrote")
    parser.add_argument("--personas", default=",".join(DEFAULT_PERSONAS))
    parser.add_argument("--robust", default="tf=T,tf=F,extraversion=high,extraversion=low")
    parser.add_argument("--persona", default="tf=T")
    parser.add_argument("--layers", default="8,16,24")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--protect", choices=["on", "off"], default="on", help="PALETTE's protect option")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--memit", choices=["on", "off"], default="on", help="costs: time MEMIT too")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--settings", default="default;kl_factor=0.5;clamp=2", help="specificity: palette options")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.part in ("report", "rescore"):
        (report if args.part == "report" else rescore)(args.files if args.part == "report" else args)
        return
    results = {"main": run_main, "ablation": run_ablation, "noise": run_noise, "stats": run_stats,
               "costs": run_costs, "specificity": run_specificity}[args.part](args)
    save(args.json, results)


if __name__ == "__main__":
    main()
