"""`personaedit edit steer` against repeng 0.4 (its README recipe) for extraversion, both poles, on the default model.

repeng, in its own virtual environment, follows its README: the model wrapped by `ControlModel` at layers −5 … −17,
a dataset made by `make_dataset("Act as if you're extremely {persona}.", [positive], [negative], suffixes)` — the
persona instruction as the user turn, a truncated reply as the start of the assistant turn (here through the model's
chat template, as repeng does for chat models) — and `ControlVector.train` (PCA of the paired differences, one
unit direction per layer). The README's suffix file is not in the wheel; the suffixes are the token prefixes (1 … 11 tokens) of
16 of this package's training-split neutral texts, the same kind of truncated plain statements: 176 pairs, against
steer's 256 (its default).
personaedit fits `edit steer --persona extraversion=high` with its defaults (or the options given with `--steer`,
e.g. `--layer 13-25 --equal-norms`: repeng's band of layers); a negative strength asks for the low pole, as a
negative coefficient does in repeng.

Measured:
- fit: both whole commands (model load included) in turn, A B A B; wall, CPU, peak RSS. personaedit runs with a
  cache folder without cached activations (its converted model shared), so it collects them as repeng does.
- trait effect against coherence: each tool answers the same held-out questions (test split: the 20 extraversion
  situational questions and `--neutral` neutral ones, 20 by default; greedy, 40 new tokens, the same chat
  template and batches: the effect table's protocol) at 4
  strengths per pole and with no edit; the text judge scores extraversion, and the effect protocol pairs each
  edited reply with the same tool's unedited reply to the same question (signed towards the pole asked for, 95%
  interval). Coherence: the base model's perplexity of each reply (the same reading for both tools), as a paired
  change of its logarithm (its exp: the perplexity ratio of the effect table), the share of coherent replies
  (n-gram entropy) and the share of plausible replies (perplexity <= 50). "At equal coherence": each tool's
  largest effect among its strengths within `personaedit calibrate`'s budget (perplexity ratio <= 1.5, >= 90%
  coherent), and, looser, among those whose replies stay at least 90% plausible.
- generation: 16 prompts, exactly 48 new tokens each (min = max), with and without the edit, interleaved, through
  the same `generate` of transformers in both tools; tokens per second.

Run: python benchmarks/peers/repeng_vs.py [--pairs 3] [--steer '--layer 13-25 --equal-norms'] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peerlib import (OUR_PYTHON, Pairs, Run, alternate, ensure_venv, fail, installed_version, load_average,  # noqa: E402
                     print_pairs, ratio_row, recorded, run_json)

from personaedit.fileio import write_json_atomic  # noqa: E402  (imports no torch)

REPENG = ["repeng==0.4.0", "transformers==5.24.0"]  # transformers as in personaedit's environment: the same generate
PERSONAEDIT = str(OUR_PYTHON.parent / "personaedit")
OUR_STRENGTHS = (0.5, 1.0, 1.5, 2.0)
PEER_COEFFICIENTS = (1.0, 2.0, 4.0, 8.0)
MAX_NEW_TOKENS = 40  # as the effect table of docs/BENCHMARKS.md (benchmarks/effect_table.py)
PLAUSIBLE_SHARE = 0.9
COHERENT_SHARE = 0.9  # calibrate's: replies coherent by n-gram entropy (eval.metrics.is_coherent)
PERPLEXITY_BUDGET = 1.5  # calibrate's budget: the edited replies' perplexity over the unedited ones'
TEMPLATE = "Act as if you're extremely {persona}."
POSITIVE, NEGATIVE = ["extraverted, outgoing and talkative"], ["introverted, reserved and quiet"]
SUFFIX_TEXTS, SUFFIX_TOKENS = 16, 12

# Runs under repeng's environment. Modes: fit (save the directions), generate (replies at coefficients), throughput.
PEER = r"""
import json, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from repeng import ControlModel, ControlVector, DatasetEntry

args = json.loads(sys.argv[1])
torch.set_grad_enabled(False)
tok = AutoTokenizer.from_pretrained(args["model"])
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
model = ControlModel(model, list(range(-5, -18, -1)))  # the README's layers

def chat(user, reply=""):
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True) + reply

def load_vector():
    saved = np.load(args["vector"])
    return ControlVector(model_type=model.config.model_type, directions={int(k): saved[k] for k in saved.files})

def batches(prompts):
    texts = [chat(q) for q in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(tok(texts[i], add_special_tokens=False)["input_ids"]))
    for start in range(0, len(order), 16):
        chunk = order[start:start + 16]
        yield chunk, tok([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)

def run(batch, new, least=0):
    return model.generate(**batch, max_new_tokens=new, min_new_tokens=least, do_sample=False, temperature=None,
                          top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=args["stops"])

if args["mode"] == "fit":
    suffixes = []
    for text in args["texts"]:
        tokens = tok.tokenize(text)[: args["suffix_tokens"]]
        suffixes += [tok.convert_tokens_to_string(tokens[:i]) for i in range(1, len(tokens))]
    dataset = [DatasetEntry(positive=chat(args["template"].format(persona=p), s),
                            negative=chat(args["template"].format(persona=n), s))
               for s in suffixes for p, n in zip(args["positive"], args["negative"])]
    start = time.perf_counter()
    vector = ControlVector.train(model, tok, dataset)
    seconds = time.perf_counter() - start
    np.savez(args["out"], **{str(k): v for k, v in vector.directions.items()})
    print(json.dumps({"train_seconds": seconds, "pairs": len(dataset), "layers": sorted(vector.directions)}))
elif args["mode"] == "generate":
    vector, replies = load_vector(), {}
    for coeff in args["coefficients"]:
        model.reset() if coeff == 0 else model.set_control(vector, coeff)
        out = [""] * len(args["prompts"])
        for chunk, batch in batches(args["prompts"]):
            ids = run(batch, args["max_new_tokens"])
            for i, text in zip(chunk, tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)):
                out[i] = text.strip()
        replies[str(coeff)] = out
    model.reset()
    print(json.dumps(replies))
else:
    vector, rates = load_vector(), {"none": [], "edit": []}
    (_, batch), = list(batches(args["prompts"]))
    for _ in range(args["repeats"]):
        for name in rates:
            model.reset() if name == "none" else model.set_control(vector, args["coefficient"])
            start = time.perf_counter()
            run(batch, args["new_tokens"], args["new_tokens"])
            rates[name].append(len(args["prompts"]) * args["new_tokens"] / (time.perf_counter() - start))
    print(json.dumps(rates))
"""

# Runs under personaedit's environment: the shared inputs, our replies and throughput, and the scoring of both.
OURS = r"""
import contextlib, json, math, statistics, sys, time
import torch
from personaedit.data import records
from personaedit.edits import load_edit
from personaedit.eval import readings
from personaedit.eval.effect import paired_effect
from personaedit.merge import model_folder
from personaedit.models import generate, load_model
from personaedit.models.loading import cache_dir
from personaedit.models.forward import encode_prompts
from personaedit.methods.capture import render_prompts
from personaedit.models.generation import stop_token_ids

args = json.loads(sys.argv[1])
torch.set_grad_enabled(False)
if args["mode"] == "inputs":
    questions = [r["question"] for r in records("situational_questions", "test", trait="extraversion")]
    questions += [r["question"] for r in records("neutral_questions", "test")][: args["neutral"]]
    lm = load_model("default")
    print(json.dumps({"model": str(model_folder("default")), "cache": str(cache_dir()), "questions": questions,
                      "stops": stop_token_ids(lm),
                      "texts": [r["text"] for r in records("neutral_text", "train")][: args["texts"]],
                      "throughput_prompts": [r["question"] for r in records("neutral_questions", "train")[:16]]}))
    sys.exit()
lm = load_model("default")
edit = load_edit(args["edit"])
if args["mode"] == "generate":
    replies = {}
    for strength in args["strengths"]:
        with edit.apply(lm, strength) if strength else contextlib.nullcontext():
            replies[str(strength)] = [r.strip() for r in generate(lm, args["questions"], max_new_tokens=args["max_new_tokens"])]
    print(json.dumps(replies))
elif args["mode"] == "throughput":
    texts, templated = render_prompts(lm, [(None, q) for q in args["prompts"]])
    batch = encode_prompts(lm, texts, add_special_tokens=not templated)
    rates = {"none": [], "edit": []}
    for _ in range(args["repeats"]):
        for name in rates:
            with edit.apply(lm, args["strength"]) if name == "edit" else contextlib.nullcontext():
                start = time.perf_counter()
                lm.model.generate(**batch, max_new_tokens=args["new_tokens"], min_new_tokens=args["new_tokens"],
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=lm.tokenizer.pad_token_id)
                rates[name].append(len(args["prompts"]) * args["new_tokens"] / (time.perf_counter() - start))
    print(json.dumps(rates))
else:  # score both tools' replies
    from personaedit.eval.metrics import is_coherent
    from personaedit.eval.text_judge import TextJudge
    judge, questions, result = TextJudge.load(), args["questions"], {}
    for tool, by_strength in json.loads(open(args["replies_file"], encoding="utf-8").read()).items():
        base = by_strength["0"] if "0" in by_strength else by_strength["0.0"]
        base_score = [s["extraversion"] for s in judge.score(base)]
        base_ppl = readings.reply_perplexities(lm, questions, base)
        base_coherent = sum(map(is_coherent, base)) / len(base)
        rows = []
        for key, replies in by_strength.items():
            strength = float(key)
            scores = [s["extraversion"] for s in judge.score(replies)]
            ppl = readings.reply_perplexities(lm, questions, replies)
            sign = 1.0 if strength >= 0 else -1.0
            effect = paired_effect(base_score, scores, sign=sign)
            cost = paired_effect([math.log(p) for p in base_ppl], [math.log(p) for p in ppl])
            rows.append({"strength": strength, "effect": effect.to_dict(),
                         "log_ppl_change": cost.to_dict(), "plausible": sum(map(readings.plausible, ppl)) / len(ppl),
                         "coherent": sum(map(is_coherent, replies)) / len(replies), "base_coherent": base_coherent,
                         "median_ppl": statistics.median(ppl), "mean_score": statistics.fmean(scores)})
        result[tool] = rows
    print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="A B pairs of the fit (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved throughput repeats (default 3)")
    parser.add_argument("--neutral", type=int, default=20, help="neutral test questions besides the 20 extraversion ones")
    parser.add_argument("--peer-coefficients", default=",".join(map(str, PEER_COEFFICIENTS)))
    parser.add_argument("--strengths", default=",".join(map(str, OUR_STRENGTHS)))
    parser.add_argument("--steer", default="",
                        help="further `edit steer` options for ours, e.g. '--layer 13-25 --equal-norms' (repeng's band)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--reuse-fit", action="store_true",
                        help="with --work: reuse the fit pairs and both edits a previous run left there")
    args = parser.parse_args()
    try:
        coefficients = [float(x) for x in args.peer_coefficients.split(",")]
        strengths = [float(x) for x in args.strengths.split(",")]
    except ValueError:
        fail("--peer-coefficients and --strengths are comma-separated numbers")
    if args.pairs < 1 or min(coefficients + strengths) <= 0:
        fail("--pairs >= 1; strengths and coefficients > 0 (the low pole is their negation)")
    try:
        steer_options = shlex.split(args.steer)
    except ValueError as exc:
        fail(f"--steer: {exc}")
    if steer_options and not steer_options[0].startswith("--"):
        fail(f"--steer takes `edit steer` options (--layer 13-25 ...), not {steer_options[0]!r}")
    suffix = re.sub(r"[^\w.=+-]+", "_", " ".join(steer_options).replace("--", "")).strip("_")
    with recorded("repeng_vs" + (f"-{suffix}" if suffix else "")):
        compare(args, strengths, coefficients, steer_options)


def compare(args: argparse.Namespace, strengths: list[float], coefficients: list[float], steer_options: list[str]) -> None:
    peer_python = ensure_venv("repeng", REPENG)
    work = args.work or Path(tempfile.mkdtemp(prefix="repeng-vs-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        inputs = run_json(OUR_PYTHON, OURS, json.dumps({"mode": "inputs", "neutral": args.neutral, "texts": SUFFIX_TEXTS}))
        print(f"repeng {installed_version(peer_python, 'repeng')} ({peer_python.parent.parent}); "
              f"{len(inputs['questions'])} test questions; load average {load_average()}", flush=True)
        ours_dir, peer_vector = work / "steer", work / "repeng.npz"
        fit_spec = {"mode": "fit", "model": inputs["model"], "stops": inputs["stops"], "texts": inputs["texts"],
                    "suffix_tokens": SUFFIX_TOKENS, "template": TEMPLATE, "positive": POSITIVE, "negative": NEGATIVE,
                    "out": str(peer_vector)}
        ours = [PERSONAEDIT, "edit", "steer", "--model", "default", "--persona", "extraversion=high", *steer_options,
                "--out", str(ours_dir)]
        peer = [str(peer_python), "-c", PEER, json.dumps(fit_spec)]
        record = work / "fit.json"
        if args.reuse_fit and record.is_file() and ours_dir.is_dir() and peer_vector.is_file():
            saved = json.loads(record.read_text())
            pairs = Pairs("steer fit", [Run(**r) for r in saved["a"]], [Run(**r) for r in saved["b"]])
            fitted = saved["peer"]
            print(f"fit: the pairs and both fitted edits reused from {work} (a previous run)")
        else:
            cache = cold_cache(Path(inputs["cache"]), work / "cache")
            pairs = alternate("steer fit", ours, peer, pairs=args.pairs, env={"PERSONAEDIT_CACHE": str(cache)},
                              before=(["rm", "-rf", str(ours_dir), str(cache / "activations")], None), log_dir=work)
            # the last repeng run saved the directions and printed what it did (its last JSON line)
            log = (work / f"steer_fit-B{args.pairs - 1}.log").read_text().splitlines()
            fitted = json.loads(next(line for line in reversed(log) if line.startswith('{"train_seconds"')))
            write_json_atomic(record, {"a": [asdict(r) for r in pairs.a], "b": [asdict(r) for r in pairs.b], "peer": fitted})
        print_pairs(pairs)
        print(f"    repeng: {fitted['pairs']} pairs, {len(fitted['layers'])} layers, ControlVector.train "
              f"{fitted['train_seconds']:.1f} s of its last run", flush=True)

        both = [-s for s in reversed(strengths)] + [0.0] + strengths
        peer_both = [-c for c in reversed(coefficients)] + [0.0] + coefficients
        replies = {
            "personaedit steer": run_json(OUR_PYTHON, OURS, json.dumps(
                {"mode": "generate", "edit": str(ours_dir), "strengths": both, "questions": inputs["questions"],
                 "max_new_tokens": MAX_NEW_TOKENS})),
            "repeng": run_json(peer_python, PEER, json.dumps(
                {"mode": "generate", "model": inputs["model"], "stops": inputs["stops"], "vector": str(peer_vector),
                 "coefficients": peer_both, "prompts": inputs["questions"], "max_new_tokens": MAX_NEW_TOKENS})),
        }
        write_json_atomic(work / "replies.json", replies)
        same = sum(a == b for a, b in zip(replies["personaedit steer"]["0.0"], replies["repeng"]["0.0"]))
        print(f"unedited greedy replies identical in both tools: {same} / {len(inputs['questions'])}")
        # the replies go by file: as one argument they can pass the kernel's 128 KiB limit (looping replies are long)
        scored = run_json(OUR_PYTHON, OURS, json.dumps({"mode": "score", "edit": str(ours_dir),
                                                         "replies_file": str(work / "replies.json"),
                                                         "questions": inputs["questions"]}))
        write_json_atomic(work / "scored.json", scored)
        report_effects(scored)

        middle = strengths[len(strengths) // 2 - 1], coefficients[len(coefficients) // 2 - 1]
        ours_rate = run_json(OUR_PYTHON, OURS, json.dumps({"mode": "throughput", "edit": str(ours_dir), "strength": middle[0],
                                                           "prompts": inputs["throughput_prompts"], "new_tokens": 48,
                                                           "repeats": args.repeats}))
        peer_rate = run_json(peer_python, PEER, json.dumps({"mode": "throughput", "model": inputs["model"],
                                                            "stops": inputs["stops"], "vector": str(peer_vector),
                                                            "coefficient": middle[1], "new_tokens": 48,
                                                            "prompts": inputs["throughput_prompts"],
                                                            "repeats": args.repeats}))
        report_throughput(ours_rate, peer_rate, middle)
        compare_at_equal_coherence(scored)
        print(f"load average at the end: {load_average()}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def cold_cache(real: Path, folder: Path) -> Path:
    """A personaedit cache folder that shares the real one's converted models and encoders but not its cached
    activations, so that steer's fit collects its activations as repeng's does (the caller empties `activations`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in real.iterdir():
        link = folder / entry.name
        if entry.name != "activations" and not link.exists():
            link.symlink_to(entry)
    return folder


def report_effects(scored: dict) -> None:
    """Print every strength's effect and coherence."""
    for tool, rows in scored.items():
        print(f"{tool}: strength | extraversion effect towards the pole [95%] n | log-perplexity change [95%] "
              "(perplexity x) | coherent | plausible | median reply perplexity")
        for row in sorted(rows, key=lambda r: r["strength"]):
            e, c = row["effect"], row["log_ppl_change"]
            print(f"    {row['strength']:+5.1f} | {e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] {e['n']} "
                  f"({e['verdict']}) | {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] ({math.exp(c['mean']):.2f}) "
                  f"| {row['coherent']:.0%} | {row['plausible']:.0%} | {row['median_ppl']:.1f}")


# "Equal coherence", read two ways: within `personaedit calibrate`'s budget (the base model's perplexity of the
# edited replies, geometric mean, <= 1.5x that of the unedited replies, and >= 90% of replies coherent by n-gram
# entropy, or the unedited share where that is lower), or, looser, >= 90% of replies plausible (perplexity <= 50).
BUDGETS = {
    f"calibrate's budget (perplexity x <= {PERPLEXITY_BUDGET:g}, coherent >= {COHERENT_SHARE:.0%})":
        lambda row: (math.exp(row["log_ppl_change"]["mean"]) <= PERPLEXITY_BUDGET
                     and row["coherent"] >= min(COHERENT_SHARE, row["base_coherent"])),
    f">= {PLAUSIBLE_SHARE:.0%} plausible": lambda row: row["plausible"] >= PLAUSIBLE_SHARE,
}


def best_within(rows: list[dict], pole: str, within) -> dict | None:
    """The row of the pole's strengths with the largest effect among those within the coherence budget."""
    kept = [r for r in rows if r["strength"] != 0 and (r["strength"] > 0) == (pole == "high") and within(r)]
    return max(kept, key=lambda r: r["effect"]["mean"], default=None)


def compare_at_equal_coherence(scored: dict) -> None:
    """Per pole and budget: each tool's largest effect within it, and the target (ours larger)."""
    (_, ours), (_, peer) = scored.items()
    for budget, within in BUDGETS.items():
        for pole in ("high", "low"):
            found = best_within(ours, pole, within), best_within(peer, pole, within)
            name = f"extraversion {pole}, largest effect at {budget}"
            if None in found:
                missing = "ours" if found[0] is None else "repeng"
                print(f"{name}: no strength of {missing} stays within it: no comparison at equal coherence")
                continue
            (o, p) = found
            ok = o["effect"]["mean"] > p["effect"]["mean"]
            value = (f"ours {o['effect']['mean']:+.3f} [{o['effect']['low']:+.3f}, {o['effect']['high']:+.3f}] at "
                     f"{o['strength']:g} vs repeng {p['effect']['mean']:+.3f} [{p['effect']['low']:+.3f}, "
                     f"{p['effect']['high']:+.3f}] at {p['strength']:g}")
            print(f"{name:<58} {value}   target ours larger {'met' if ok else 'NOT MET'}")


def report_throughput(ours: dict, peer: dict, middle: tuple[float, float]) -> None:
    for tool, rates, strength in (("personaedit steer", ours, middle[0]), ("repeng", peer, middle[1])):
        ratios = [e / n for e, n in zip(rates["edit"], rates["none"])]
        print(ratio_row(f"{tool} (strength {strength:g}): edited/unedited tok/s", ratios, 0.95, higher_is_better=True))
    print(ratio_row("unedited tok/s, ours/repeng", [a / b for a, b in zip(ours["none"], peer["none"])]))
    print(ratio_row("edited tok/s, ours/repeng", [a / b for a, b in zip(ours["edit"], peer["edit"])]))
    print(f"    tok/s without / with the edit: ours {sorted(ours['none'])} / {sorted(ours['edit'])}; "
          f"repeng {sorted(peer['none'])} / {sorted(peer['edit'])}")


if __name__ == "__main__":
    main()
