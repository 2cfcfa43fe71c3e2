"""Is the text judge specific and calibrated, and does its unscorable flag catch degenerate text?

Modes (features are cached under /tmp/personaedit-judge-features, keyed by the sha256 of each text, so a
second run encodes nothing):
  python benchmarks/judge_specificity.py [--head HEAD]
      the shipped (or given) head on the test split and on judge_check: pole accuracy per dimension (texts
      that express it), off-target mean |score| (texts of the other dimensions), mean |score| on neutral
      text, the trait intercorrelation matrix, expected calibration error; with --plot PNG a reliability
      diagram. The same numbers as `personaedit judge evaluate`.
  python benchmarks/judge_specificity.py --select
      the model selection on the train and validation splits only: for each head form (softmax3, gated),
      each C of the grid, validation pole accuracy, off-target mean |score| and balanced log-loss.
  python benchmarks/judge_specificity.py --degenerate [--replies REPLIES.jsonl]
      the unscorable rules (eval/degenerate.py) on every text the project wrote (none may be flagged), on
      random token soup decoded from the default model's and MPNet's tokenizers, on synthetic loops, and on
      model replies (`personaedit generate --json` output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from personaedit.data import records
from personaedit.eval import degenerate

CACHE = Path(os.environ.get("PERSONAEDIT_FEATURE_CACHE", "/tmp/personaedit-judge-features"))


class CachedEncoder:
    """The judge's MPNet features, each text encoded once and kept in CACHE/<sha256>.npy."""

    def __init__(self, key: str = "mpnet") -> None:
        self.key = key
        self._encoder = None

    def features(self, texts, on_progress=None):
        folder = CACHE / self.key
        folder.mkdir(parents=True, exist_ok=True)
        names = [folder / (hashlib.sha256(t.encode()).hexdigest() + ".npy") for t in texts]
        missing = list(dict.fromkeys(t for t, p in zip(texts, names) if not p.is_file()))
        if missing:
            if self._encoder is None:
                from personaedit.models.encoders import SentenceEncoder
                self._encoder = SentenceEncoder(encoder=self.key)
            print(f"encoding {len(missing)} texts", file=sys.stderr, flush=True)
            for text, row in zip(missing, self._encoder.features(missing, on_progress)):
                np.save(folder / (hashlib.sha256(text.encode()).hexdigest() + ".npy"), row.astype(np.float32))
        out = np.stack([np.load(p) for p in names]) if names else np.zeros((0, 0), np.float32)
        if on_progress is not None:
            on_progress(len(texts), len(texts))
        return out


# ------------------------------------------------------------------------------------------ degenerate


def project_texts() -> dict[str, list[str]]:
    """Every running text the project wrote (the files' text, question and context fields)."""
    out = {}
    for name in ("opinions", "trait_texts", "mbti_texts", "neutral_text", "persona_descriptions"):
        out[name] = [r["text"] for r in records(name)]
    out["judge_check"] = [r["text"] for r in records("judge_check")]
    out["judge_check (context)"] = [r["context"] for r in records("judge_check")]
    for name in ("neutral_questions", "situational_questions"):
        out[name] = [r["question"] for r in records(name)]
    return out


def token_soup(tokenizer, n: int, seed: int) -> list[str]:
    """`n` decoded sequences of 20-60 token ids drawn uniformly from the tokenizer's vocabulary."""
    rng = np.random.default_rng(seed)
    return [tokenizer.decode(rng.integers(0, len(tokenizer), int(rng.integers(20, 61))).tolist(),
                             skip_special_tokens=True) for _ in range(n)]


def synthetic_loops(texts: list[str], seed: int) -> dict[str, list[str]]:
    """Loops built from project texts: a cut-off text followed by a fragment said over and over."""
    rng = np.random.default_rng(seed)
    picks = [texts[i] for i in rng.choice(len(texts), 40, replace=False)]
    out: dict[str, list[str]] = {"fragment loop (x4-12)": [], "sentence said 3-5 times": [], "word loop (x8-20)": []}
    for text in picks:
        words = text.split()
        cut = int(rng.integers(3, max(4, len(words) // 2)))
        head = " ".join(words[:cut])
        piece = words[cut].strip(".,;:!?").upper()[:4] or "LEM"
        out["fragment loop (x4-12)"].append(head + " " + "-".join([piece] * int(rng.integers(4, 13))))
        sentence = text.split(". ")[0].rstrip(".") + "."
        out["sentence said 3-5 times"].append(" ".join([sentence] * int(rng.integers(3, 6))))
        out["word loop (x8-20)"].append(head + " " + " ".join([words[cut]] * int(rng.integers(8, 21))))
    return out


def flagged(texts: list[str]) -> tuple[int, Counter]:
    results = [degenerate.assess(t) for t in texts]
    return sum(r.unscorable for r in results), Counter(reason for r in results for reason in r.reasons)


def run_replies(path: Path) -> None:
    """The unscorable rules on model replies: a JSONL file with a "text" per line (`personaedit generate --json`)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    got = [degenerate.assess(r["text"]) for r in rows]
    print(f"{path}: {sum(g.unscorable for g in got)} of {len(rows)} replies unscorable")
    for row, g in zip(rows, got):
        if g.unscorable:
            print(f"  {g.reasons} (3-gram repeats {g.repeated_trigrams:.2f}, loop {g.loop_share:.2f}): {row['text'][:160]!r}")
    print("  3-gram repeat share of the others, largest: "
          f"{sorted((g.repeated_trigrams for g in got if not g.unscorable), reverse=True)[:5]}")


def run_degenerate(seed: int) -> None:
    from transformers import AutoTokenizer

    from personaedit.models.encoders import mpnet_dir
    from personaedit.models.loading import converted_gguf_folder, default_model_gguf

    own = project_texts()
    print(f"project texts: {sum(map(len, own.values()))} (none may be flagged); minimum words, loop share, 3-gram "
          "repeats, distinct ratio, function-word share, word-like share over each file (min / max as fits the rule)")
    for name, texts in own.items():
        got = [degenerate.assess(t) for t in texts]
        count, reasons = flagged(texts)
        print(f"  {name:24s} n={len(texts):4d} flagged={count} {dict(reasons) or ''}  words≥{min(r.words for r in got)}"
              f"  loop≤{max(r.loop_share for r in got):.2f}  repeats≤{max(r.repeated_trigrams for r in got):.2f}"
              f"  distinct≥{min(r.distinct_ratio for r in got):.2f}  function≥{min(r.function_share for r in got):.2f}"
              f"  wordlike≥{min(r.wordlike_share for r in got):.2f}")
        for text, r in zip(texts, got):
            if r.unscorable:
                print(f"    FLAGGED {r.reasons}: {text[:100]!r}")
    print("degenerate texts (all should be flagged)")
    smol = AutoTokenizer.from_pretrained(converted_gguf_folder(default_model_gguf()), local_files_only=True)
    mpnet = AutoTokenizer.from_pretrained(mpnet_dir(), local_files_only=True)
    sets = {"token soup, default model's tokenizer": token_soup(smol, 200, seed),
            "token soup, MPNet's word pieces": token_soup(mpnet, 200, seed + 1),
            **synthetic_loops(own["judge_check"], seed),
            "the issue's loop": ["I'd LOVE to do a free-LEM-LEM-LEM-LEM-LEM-LEM-LEM-LEM",
                                 "I'd LOVE to do a free-LEM-LEM-LEM-LEM…"]}
    for name, texts in sets.items():
        got = [degenerate.assess(t) for t in texts]
        count, reasons = flagged(texts)
        print(f"  {name:40s} n={len(texts):4d} flagged={count} ({count / len(texts):.1%}) {dict(reasons)}"
              f"  function share median {np.median([r.function_share for r in got]):.2f}"
              f" (max {max(r.function_share for r in got):.2f})"
              f"  word-like median {np.median([r.wordlike_share for r in got]):.2f}")
        for text, r in zip(texts, got):
            if not r.unscorable:
                print(f"    MISSED (words {r.words}, function {r.function_share:.2f}, wordlike {r.wordlike_share:.2f}, "
                      f"loop {r.loop_share:.2f}): {text[:120]!r}")


# ------------------------------------------------------------------------------------------ judge


def run_select(args: argparse.Namespace) -> None:
    from personaedit.eval.judge_training import C_GRID, FORMS, selection_table

    forms = args.forms.split(",") if args.forms else list(FORMS)
    grid = [float(c) for c in args.c.split(",")] if args.c else list(C_GRID)
    table = selection_table(CachedEncoder(), forms, grid)
    print(json.dumps(table, indent=1))


def run_evaluate(args: argparse.Namespace) -> None:
    from personaedit.eval.judge_training import reliability_plot, specificity_report
    from personaedit.eval.text_judge import TextJudge

    judge = TextJudge.load(args.head, encoder=CachedEncoder())
    report = specificity_report(judge)
    print(json.dumps(report, indent=1))
    if args.plot:
        reliability_plot(report, args.plot)
        print(f"reliability diagram -> {args.plot}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degenerate", action="store_true")
    parser.add_argument("--replies", type=Path, help="with --degenerate: also check these replies (JSONL, \"text\")")
    parser.add_argument("--select", action="store_true")
    parser.add_argument("--forms", help="comma-separated head forms for --select")
    parser.add_argument("--c", help="comma-separated C grid for --select")
    parser.add_argument("--head", type=Path)
    parser.add_argument("--plot", type=Path, help="write the reliability diagram here (PNG)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.degenerate:
        run_degenerate(args.seed)
        if args.replies:
            run_replies(args.replies)
    elif args.select:
        run_select(args)
    else:
        run_evaluate(args)


if __name__ == "__main__":
    main()
