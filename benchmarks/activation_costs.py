"""Costs of the activation methods on the default model.

1. Collecting activations (all middle layers, last token, as steer/dpnle do) vs a plain batched
   forward pass over the same prompts: throughput ratio (target >= 0.8).
2. Generation with an activation edit (steer, dpnle at their defaults) applied vs without, every reply
   forced to the same length: tokens/s ratio (target >= 0.95), medians of interleaved repeats.
Run: python benchmarks/activation_costs.py [--prompts 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median_seconds, row  # noqa: E402

from personaedit.data import records  # noqa: E402
from personaedit.methods import fit_edit  # noqa: E402
from personaedit.methods.capture import capture, render_prompts  # noqa: E402
from personaedit.methods.contrast import contrastive_pairs  # noqa: E402
from personaedit.models import load_model  # noqa: E402
from personaedit.models.forward import encode_prompts, position_ids  # noqa: E402
from personaedit.persona import BIG_FIVE  # noqa: E402


def plain_forward(lm, prompts, batch_size=16) -> None:
    texts, templated = render_prompts(lm, prompts)
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = encode_prompts(lm, texts[start:start + batch_size], add_special_tokens=not templated)
            lm.model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = load_model("default")
    prompts = contrastive_pairs(BIG_FIVE["extraversion"], args.prompts).high
    sites = [("mlp_hidden", l) for l in lm.arch.middle_layers(0.25, 0.75)]
    plain, _ = median_seconds(lambda: plain_forward(lm, prompts), args.repeats)
    collect, _ = median_seconds(lambda: capture(lm, prompts, sites, use_cache=False), args.repeats)
    print(row(f"forward, {args.prompts} prompts", f"{plain:.1f} s", "-", None))
    print(row(f"capture {len(sites)} layers' mlp_hidden, same prompts", f"{collect:.1f} s", "-", None))
    print(row("capture / plain forward throughput", f"{plain / collect:.2f}x", ">= 0.8x", plain / collect >= 0.8))

    questions = [r["question"] for r in records("neutral_questions", "train")[:16]]
    texts, templated = render_prompts(lm, [(None, q) for q in questions])
    batch = encode_prompts(lm, texts, add_special_tokens=not templated)
    new_tokens = 48

    def fixed_length_generation() -> None:
        # every reply exactly `new_tokens` long, so both conditions generate the same number of tokens
        with torch.no_grad():
            lm.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=lm.tokenizer.pad_token_id)

    edits = {"steer": fit_edit("steer", lm, "extraversion=high"), "dpnle": fit_edit("dpnle", lm, "extraversion=high")}
    rates: dict[str, list[float]] = {"none": [], **{name: [] for name in edits}}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every condition alike
        for name in rates:
            with edits[name].apply(lm) if name in edits else contextlib.nullcontext():
                start = time.perf_counter()
                fixed_length_generation()
                rates[name].append(len(questions) * new_tokens / (time.perf_counter() - start))
    plain_rate = statistics.median(rates["none"])
    print(row(f"generation without an edit ({len(questions)} x {new_tokens} tokens)", f"{plain_rate:.1f} tok/s", "-", None))
    for name, edit in edits.items():
        rate = statistics.median(rates[name])
        touched = sum(i.touched for i in edit.interventions)
        print(row(f"generation with a {name} edit ({touched} values)", f"{rate:.1f} tok/s", "-", None))
        print(row(f"{name}-edited / unedited tokens per second", f"{rate / plain_rate:.2f}x", ">= 0.95x",
                  rate / plain_rate >= 0.95))


if __name__ == "__main__":
    main()
