"""Text-judge scoring speed on one thread: texts/s for each head, scoring the first 200 check-set replies.

Heads alternate for --rounds rounds; each judge's encoder is loaded (and warmed on 4 texts) before timing.
Run: python benchmarks/judge_speed.py OLD_HEAD.safetensors [NEW_HEAD.safetensors ...]
(default: the shipped head alone). An old MiniLM head: `git show 438e76d:src/personaedit/data/resources/text_judge_head.safetensors`
and its `.json` beside it.
"""

from __future__ import annotations

import argparse
import time

import torch

from personaedit.data import records
from personaedit.eval.text_judge import TextJudge, default_head_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heads", nargs="*", default=[str(default_head_path())])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    texts = [r["text"] for r in records("judge_check")][: args.texts]
    judges = {head: TextJudge.load(head) for head in args.heads}
    for judge in judges.values():
        judge.score(texts[:4])
    for r in range(args.rounds):
        for head, judge in judges.items():
            start = time.perf_counter()
            judge.score(texts)
            seconds = time.perf_counter() - start
            print(f"round {r + 1} {judge.encoder_key} ({head}): {len(texts) / seconds:.1f} texts/s ({seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
