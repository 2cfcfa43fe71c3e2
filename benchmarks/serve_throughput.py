"""`personaedit serve` on the default model: 16 concurrent requests under 4 different edits vs plain batched
generation of the same 16 prompts; first-token latency; 100 malformed requests.

The server runs in this process (uvicorn on a free loopback port, in a thread) and is driven over HTTP by
16 concurrent streaming chat requests, 4 per edit (prompt: context, steer and dpnle: activation,
palette: weight, low rank). Fitted edits are saved under --edits-dir (default: in the personaedit cache)
and reused by later runs.

Run: python benchmarks/serve_throughput.py [--repeats 3] [--new-tokens 48] [--batch-wait-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import row  # noqa: E402

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from personaedit.data import records  # noqa: E402
from personaedit.demo import DEMO_METHODS  # noqa: E402
from personaedit.edits import load_edit  # noqa: E402
from personaedit.methods import fit_edit  # noqa: E402
from personaedit.models import generate, load_model  # noqa: E402
from personaedit.models.loading import cache_dir  # noqa: E402
from personaedit.serve.app import create_app  # noqa: E402

PERSONA = "extraversion=high"
METHODS = ("prompt", "steer", "dpnle", "palette")  # context, activation, activation, weight (low rank)


def fitted_edits(lm, folder: Path):
    edits = {}
    for method in METHODS:
        where = folder / method
        if (where / "edit.json").exists():
            edits[method] = (load_edit(where), 1.0)
        else:
            edit = fit_edit(method, lm, PERSONA, **DEMO_METHODS.get(method, {}))
            edit.save(where)
            edits[method] = (edit, 1.0)
    return edits


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


async def one_stream(client: httpx.AsyncClient, body: dict, started: float) -> tuple[str, int, float | None]:
    """(text, completion tokens, seconds from the batch start to the first generated text)."""
    text, tokens, first = "", 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    text += piece
                    first = first if first is not None else time.perf_counter() - started
    return text, tokens, first


async def concurrent(base: str, prompts: list[str], models: list[str], new_tokens: int):
    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, {
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "stream": True, "stream_options": {"include_usage": True}}, started) for prompt, model in zip(prompts, models)))
        return time.perf_counter() - started, results


MALFORMED = [
    (b"{not json", None), (b"[]", None), (None, {"messages": "hi"}), (None, {"messages": []}),
    (None, {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
    (None, {"model": "no-such-edit", "messages": [{"role": "user", "content": "x"}]}),
    (None, {"persona": "extrovertedness=high", "messages": [{"role": "user", "content": "x"}]}),
    (None, {"messages": [{"role": "wizard", "content": "x"}]}),
    (None, {"messages": [{"role": "user", "content": "x"}], "temperature": -2}),
    (None, {"messages": [{"role": "user", "content": "x"}], "n": 5}),
]


async def malformed(base: str, count: int) -> tuple[int, int]:
    """(JSON errors among `count` malformed requests, status of a good request sent after them)."""
    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as client:
        async def send(i: int) -> bool:
            raw, body = MALFORMED[i % len(MALFORMED)]
            response = await (client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
                              if raw is not None else client.post("/v1/chat/completions", json=body))
            error = response.json().get("error") if 400 <= response.status_code < 500 else None
            return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)

        errors = sum(await asyncio.gather(*(send(i) for i in range(count))))
        good = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        return errors, good.status_code


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--edits-dir", type=Path, default=cache_dir() / "serve-bench-edits")
    args = parser.parse_args()
    print("load average at start: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    lm = load_model("default")
    prompts = [r["question"] for r in records("neutral_questions", "train")[:16]]
    edits = fitted_edits(lm, args.edits_dir)
    count = lambda texts: sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)  # noqa: E731

    app = create_app(lm, edits, max_batch=16, batch_wait_ms=args.batch_wait_ms)
    server, thread, base = start_server(app)
    mixed_models = [METHODS[i % len(METHODS)] for i in range(len(prompts))]
    generate(lm, prompts[:2], max_new_tokens=4)  # warm-up
    asyncio.run(concurrent(base, prompts[:2], ["default", "palette"], 4))
    # The three set-ups take turns within each repeat, so that load from other jobs on a shared machine
    # falls on all of them alike.
    plain_runs, plain_tokens, same_as_plain = [], 0, []
    measured = {label: ([], [], 0, 0, []) for label in ("4 edits", "no edit")}
    for _ in range(args.repeats):
        started = time.perf_counter()
        replies = generate(lm, prompts, max_new_tokens=args.new_tokens, batch_size=16)
        plain_runs.append(time.perf_counter() - started)
        plain_tokens = count(replies)
        for label, models in (("4 edits", mixed_models), ("no edit", ["default"] * len(prompts))):
            runs, firsts, _, _, batches = measured[label]
            batcher = app.state.batcher
            batcher.admissions.clear()
            batcher.steps.clear()
            wall, results = asyncio.run(concurrent(base, prompts, models, args.new_tokens))
            runs.append(wall)
            firsts += [first for _, _, first in results if first is not None]
            batches.append((list(batcher.admissions), max(batcher.steps)))
            measured[label] = (runs, firsts, count(text for text, _, _ in results), sum(n for _, n, _ in results), batches)
            if label == "no edit":  # continuous batching must not change a greedy reply
                same_as_plain.append(sum(text.strip() == reply for (text, _, _), reply in zip(results, replies)))
    errors, good_status = asyncio.run(malformed(base, 100))
    server.should_exit = True
    thread.join(60)  # the app's shutdown stops the batcher; exiting under a running thread can abort the process

    plain = statistics.median(plain_runs)
    print(row("plain batched generate, 16 prompts", f"{plain_tokens / plain:.1f} tok/s", "-", None))
    for label, (runs, firsts, tokens, usage, batches) in measured.items():
        wall = statistics.median(runs)
        print(row(f"serve, 16 concurrent requests, {label}", f"{tokens / wall:.1f} tok/s", "-", None))
        print(f"  runs {', '.join(f'{r:.1f}' for r in runs)} s; {tokens} tokens ({usage} by usage, end tokens "
              f"included); first-token latency median {statistics.median(firsts):.2f} s, max {max(firsts):.2f} s")
        print(f"  per run (requests prefilled together, most rows decoding together): {batches}")
    mixed_runs, _, mixed_tokens, _, _ = measured["4 edits"]
    ratio = (mixed_tokens / statistics.median(mixed_runs)) / (plain_tokens / plain)
    print(row("serve with 4 edits / plain generate (tok/s)", f"{ratio:.2f}x", ">= 0.8x", ratio >= 0.8))
    print(row("serve with 4 edits / plain generate (wall)", f"{plain / statistics.median(mixed_runs):.2f}x", "-", None))
    print(row("serve's greedy replies (no edit) identical to plain generate's", f"{min(same_as_plain)}/{len(prompts)} "
              f"(worst run)", f"{len(prompts)}/{len(prompts)}", min(same_as_plain) == len(prompts)))
    print(row("malformed requests answered with JSON errors", f"{errors}/100", "100/100", errors == 100))
    print(row("server answers after them", f"HTTP {good_status}", "200", good_status == 200))
    print(f"  plain runs {', '.join(f'{r:.1f}' for r in plain_runs)} s; {plain_tokens} tokens; "
          f"{args.new_tokens} new tokens at most; batch wait {args.batch_wait_ms:g} ms")
    print("load average at end: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
