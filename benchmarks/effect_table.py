"""Every method's trait effect on held-out test questions, with intervals: the effect table of docs/BENCHMARKS.md.

For each (method, persona) cell: fit the edit (activation methods at their calibrated setting with --calibrated:
the choice `personaedit calibrate` makes on validation questions), answer the persona's own test questions plus
neutral test questions with and without it, and report the judge's paired effect towards the persona with its 95%
interval and verdict, the share of coherent replies, and the perplexity ratio (how plausible the unedited model finds
the edited replies, relative to its own). Nothing a cell reports was used to fit or calibrate it.

Cells are appended to --out (JSON lines) as they finish; a rerun skips finished cells, so an interrupted run resumes.

python benchmarks/effect_table.py --model default --methods prompt,steer,npti,dpnle,palette \
    --personas extraversion=high,extraversion=low --calibrated --out runs/effects-default.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from personaedit.calibration import CALIBRATED, calibrate, calibrated_edit, geometric_mean
from personaedit.data import records
from personaedit.eval.effect import paired_effect
from personaedit.eval.metrics import is_coherent
from personaedit.eval.readings import reply_perplexities
from personaedit.eval.text_judge import TextJudge
from personaedit.fileio import write_json_atomic
from personaedit.methods import fit_edit
from personaedit.methods.palette import persona_requests
from personaedit.models import generate, load_model
from personaedit.models.loading import cache_dir
from personaedit.persona import BIG_FIVE, DIMENSIONS, Persona


def fit_options(method: str, persona: Persona) -> dict:
    """rome edits one request: the persona's first PALETTE adjustment query (the others fit from the persona alone)."""
    if method != "rome":
        return {}
    request = persona_requests(persona, 1)[0][0]
    return {"prompt": request.template, "subject": request.subject, "target": request.target}


def test_questions(persona: Persona, neutral: int, every_trait: bool = False) -> list[str]:
    """The persona's own traits' test situational questions (or, with `every_trait`, all 100), then neutral ones."""
    own = [r["question"] for dim in persona.dimensions() if dim.name in BIG_FIVE
           for r in records("situational_questions", "test", trait=dim.name)]
    if every_trait:
        own += [r["question"] for r in records("situational_questions", "test") if r["question"] not in own]
    if not own:  # an MBTI axis: situational questions of every trait
        own = [r["question"] for r in records("situational_questions", "test")][::5]
    return own + [r["question"] for r in records("neutral_questions", "test")][:neutral]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", default="prompt,steer,npti,dpnle,palette")
    parser.add_argument("--personas", default="extraversion=high,extraversion=low",
                        help="comma-separated specs, or 'every': each Big Five trait's and MBTI axis' two poles")
    parser.add_argument("--neutral", type=int, default=20, help="neutral test questions added to the trait's own")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--every-trait", action="store_true",
                        help="ask all 100 test situational questions, not only the persona's own trait's 20")
    parser.add_argument("--calibrated", action="store_true", help="activation methods at their calibrated setting")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and stop")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD=JSON",
                        help="fit METHOD with these options instead of calibrating it, e.g. dpnle='{\"scale\": 8}'")
    parser.add_argument("--strength", action="append", default=[], metavar="METHOD=S",
                        help="apply METHOD's edit (fitted, not calibrated) at strength S, e.g. steer=0.5")
    args = parser.parse_args()
    if args.table_only:
        print_table(args.out)
        return

    fixed = {m: json.loads(options) for m, _, options in (s.partition("=") for s in args.set)}
    strengths = {m: float(s) for m, _, s in (s.partition("=") for s in args.strength)}
    fixed.update({m: fixed.get(m, {}) for m in strengths})
    lm, judge = load_model(args.model), TextJudge.load()
    done = set()
    if args.out.exists():
        done = {(r["method"], r["persona"]) for r in map(json.loads, args.out.read_text().splitlines())}
    base_cache: dict[str, tuple[list[str], list[float]]] = {}
    specs = args.personas.split(",")
    if args.personas == "every":
        specs = [Persona(((name, level),)).spec() for name in DIMENSIONS for level in (1.0, -1.0)]
    for spec in specs:
        persona = Persona.parse(spec)
        asked = test_questions(persona, args.neutral, args.every_trait)
        for method in args.methods.split(","):
            if (method, persona.spec()) in done:
                continue
            if persona.spec() not in base_cache:
                replies = generate(lm, asked, max_new_tokens=args.max_new_tokens)
                base_cache[persona.spec()] = (replies, reply_perplexities(lm, asked, replies))
            base_replies, base_ppl = base_cache[persona.spec()]
            started = time.perf_counter()
            calibration = None
            if args.calibrated and method in CALIBRATED and method not in fixed:
                calibration = calibrate(lm, method, persona, judge, stage=lambda s: print(f"  [{method}] {s}", flush=True))
                if calibration["chosen"] is None:  # nothing within budget: the cell says so and the run goes on
                    record(args.out, {"model": args.model, "method": method, "persona": persona.spec(), "n": len(asked),
                                      "effect": None, "calibration": None, "calibration_trials": calibration["trials"]})
                    print(f"{method:8} {persona.spec():22} no setting within the calibration budget", flush=True)
                    continue
                edit = calibrated_edit(lm, method, persona, calibration)
            else:
                edit = fit_edit(method, lm, persona, **fit_options(method, persona), **fixed.get(method, {}))
            fit_seconds = time.perf_counter() - started
            with edit.apply(lm, strengths.get(method, 1.0)):
                replies = generate(lm, asked, max_new_tokens=args.max_new_tokens)
            base_towards = [persona.towards(s) for s in judge.score(base_replies)]
            towards = [persona.towards(s) for s in judge.score(replies)]
            effect = paired_effect(base_towards, towards)
            row = {
                "model": args.model, "method": method, "persona": persona.spec(), "n": len(asked),
                "effect": effect.to_dict(), "coherent_share": sum(map(is_coherent, replies)) / len(replies),
                "base_coherent_share": sum(map(is_coherent, base_replies)) / len(base_replies),
                "perplexity_ratio": geometric_mean(reply_perplexities(lm, asked, replies)) / geometric_mean(base_ppl),
                "fit_seconds": round(fit_seconds, 1), "options": fixed.get(method),
                "strength": strengths.get(method, 1.0),
                "calibration": None if calibration is None else calibration["chosen"],
                "calibration_trials": None if calibration is None else calibration["trials"],
                "samples": [{"question": q, "base": b, "edited": r} for q, b, r in list(zip(asked, base_replies, replies))[:3]],
            }
            record(args.out, row)
            print(f"{method:8} {persona.spec():22} {effect.describe()} {effect.verdict:22} "
                  f"coherent {row['coherent_share']:.0%} ppl× {row['perplexity_ratio']:.2f}", flush=True)
    print_table(args.out)


def record(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def print_calibrations(rows: list[dict]) -> None:
    """Every calibration the cells used: each setting's validation effect, coherence and perplexity ratio."""
    cached = [json.loads(p.read_text()) for p in (cache_dir() / "calibration").glob("*/*.json")]
    for row in rows:
        if row.get("calibration") and not row.get("calibration_trials"):  # a row written before trials were kept
            row["calibration_trials"] = next((c["trials"] for c in cached if c["method"] == row["method"]
                                              and c["persona"] == row["persona"] and c["chosen"] == row["calibration"]), None)
        if not row.get("calibration_trials"):
            continue
        print(f"\n{row['method']} for {row['persona']} (validation questions):")
        print("| setting | strength | effect [95% CI] | coherent | perplexity × |\n|---|---|---|---|---|")
        for t in row["calibration_trials"]:
            e = t["effect"]
            chosen = " (chosen)" if t == row["calibration"] else ""
            print(f"| {json.dumps(t['options']) if t['options'] else 'defaults'} | {t['strength']:g}{chosen} "
                  f"| {e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] | {t['coherent_share']:.0%} "
                  f"| {t['perplexity_ratio']:.2f} |")


def print_table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    print("\n| method | persona | effect [95% CI] | verdict | coherent | perplexity × | setting |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["effect"]
        if e is None:
            print(f"| {r['method']} | {r['persona']} | — | no setting within the calibration budget | | | |")
            continue
        chosen = r.get("calibration")
        setting = json.dumps(r["options"]) if r.get("options") else "defaults" if chosen is None else \
            f"strength {chosen['strength']:g} {json.dumps(chosen['options']) if chosen['options'] else ''}".strip()
        if r.get("strength", 1.0) != 1.0:
            setting = f"strength {r['strength']:g} (not calibrated)" + ("" if setting == "defaults" else f" {setting}")
        print(f"| {r['method']} | {r['persona']} | {e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] | {e['verdict']} "
              f"| {r['coherent_share']:.0%} | {r['perplexity_ratio']:.2f} | {setting} |")
    print_calibrations(rows)


if __name__ == "__main__":
    main()
