"""Batched vs one-at-a-time generation throughput on the default model (greedy, same 16 prompts).

Run: python benchmarks/generation_throughput.py [--repeats 3] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import median_seconds, row  # noqa: E402

from personaedit.data import records  # noqa: E402
from personaedit.models import generate, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    lm = load_model("default")
    prompts = [r["question"] for r in records("neutral_questions", "train")[:16]]
    replies = generate(lm, prompts, max_new_tokens=args.new_tokens)
    tokens = sum(len(lm.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)

    batched, b_runs = median_seconds(lambda: generate(lm, prompts, max_new_tokens=args.new_tokens, batch_size=16), args.repeats)
    sequential, s_runs = median_seconds(
        lambda: [generate(lm, [p], max_new_tokens=args.new_tokens) for p in prompts], args.repeats)
    ratio = sequential / batched
    print(row("generation, 16 prompts one at a time", f"{tokens / sequential:.1f} tok/s", "-", None))
    print(row("generation, 16 prompts in one batch", f"{tokens / batched:.1f} tok/s", "-", None))
    print(row("batched / sequential throughput", f"{ratio:.2f}x", ">= 3x", ratio >= 3.0))
    print(f"  {tokens} tokens; batched runs {', '.join(f'{r:.1f}' for r in b_runs)} s; "
          f"sequential runs {', '.join(f'{r:.1f}' for r in s_runs)} s")


if __name__ == "__main__":
    main()
