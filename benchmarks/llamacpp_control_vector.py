"""llama.cpp runs what `personaedit export` writes: the default model as GGUF and a steer edit as a control vector.

llama.cpp comes from llama-cpp-python, compiled from source into its own virtual environment (first run:
`pip install llama-cpp-python==0.3.36`, many minutes on 2 cores; later runs reuse it). This script
1. fits (or reuses) a steer edit for extraversion=high on the default model and exports the model
   (`--format gguf --dtype f32`) and the edit (`--format control-vector --all-positions --strength S`);
2. in the llama.cpp environment, loads the GGUF with `Llama(model_path=...)`, reads the control vector as
   llama.cpp's own loader does (common/common.cpp `common_control_vector_load_one`: `direction.N` at offset
   n_embd·(N−1), times the strength) and sets it with `llama_set_adapter_cvec(ctx, data, len, n_embd, 1,
   n_layer)` (what `--control-vector` does), then decodes greedily from the very token ids personaedit feeds
   its model (chat template applied by personaedit), with and without the vector;
3. compares with personaedit on the same ids: the logits at the last prompt position (with the vector against
   personaedit's steer at every position at layer L, and at layers L−1 and L+1 as a control for the layer
   convention), the share of identical greedy replies, and the trait shift the text judge sees
   (extraversion score with − without), llama.cpp's against personaedit's steer as fitted (generated positions).
Run: python benchmarks/llamacpp_control_vector.py --out /tmp/llamacpp-bench [--strength 1] [--prompts 12]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_venv import engine_python  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
DEFAULT_VENV = Path.home() / ".cache" / "personaedit" / "llamacpp-venv"
PERSONA = "extraversion=high"
TRAIT = "extraversion"

LLAMA_SIDE = r'''
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama

job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"], n_batch=512,
            logits_all=True, verbose=False, seed=0)  # logits are kept only with logits_all in this version
n_embd = llm.n_embd()
n_layer = llama_cpp.llama_model_n_layer(llm.model) if hasattr(llama_cpp, "llama_model_n_layer") else llama_cpp.llama_n_layer(llm.model)


def control_vector(path, strength):
    """common_control_vector_load_one: direction.N goes to offset n_embd * (N - 1); N = 0 is refused."""
    import gguf
    reader = gguf.GGUFReader(path)
    data = np.zeros(0, dtype=np.float32)
    for tensor in reader.tensors:
        head, _, index = tensor.name.partition(".")
        if head != "direction":
            continue
        layer = int(index)
        assert layer > 0, "llama.cpp refuses direction.0"
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        assert values.size == n_embd
        if data.size < n_embd * layer:
            data = np.concatenate([data, np.zeros(n_embd * layer - data.size, dtype=np.float32)])
        data[n_embd * (layer - 1): n_embd * layer] += values * strength
    return data


def greedy(ids, stops, limit):
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    out = []
    for _ in range(limit):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stops:
            break
        out.append(token)
        llm.eval([token])
    return out, first


results = {}
for condition in ("base", "vector"):
    if condition == "vector":
        data = control_vector(job["vector"], job["strength"])
        buffer = (np.ctypeslib.ctypes.c_float * data.size)(*data.tolist())
        apply = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
        code = apply(llm.ctx, buffer, data.size, n_embd, 1, n_layer)  # as common.cpp does for --control-vector
        assert code == 0, f"{apply.__name__} returned {code}"
    replies, logits = [], []
    for ids in job["prompts"]:
        tokens, first = greedy(ids, set(job["stops"]), job["max_new_tokens"])
        replies.append(tokens)
        logits.append(first.tolist())
    results[condition] = {"replies": replies, "logits": logits}
json.dump({"n_embd": n_embd, "n_layer": n_layer, "results": results}, open(sys.argv[2], "w"))
'''


def ensure_llama_venv(venv: Path) -> Path:
    def install(python: Path) -> None:
        print(f"building {LLAMA_CPP_PYTHON} from source in {venv} (many minutes on 2 cores)", flush=True)
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", LLAMA_CPP_PYTHON, "gguf"],
                       check=True, env=env)

    return engine_python(venv, "import llama_cpp, gguf", install)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    llama_python = ensure_llama_venv(args.venv)

    from personaedit.data import records
    from personaedit.edits import ActivationEdit, Intervention, load_edit
    from personaedit.eval.text_judge import TextJudge
    from personaedit.export import export_edit
    from personaedit.methods import fit_edit
    from personaedit.models import generate, load_model
    from personaedit.models.generation import build_messages, render_chat, stop_token_ids

    lm = load_model("default", device="cpu", dtype="float32")
    steer_dir = out / "steer"
    steer = load_edit(steer_dir) if (steer_dir / "edit.json").is_file() else fit_edit("steer", lm, PERSONA)
    if not (steer_dir / "edit.json").is_file():
        steer.save(steer_dir)
    model_gguf, vector_gguf = out / "default-f32.gguf", out / "steer.gguf"
    if not model_gguf.is_file():
        print(export_edit("default", "gguf", model_gguf, dtype="f32").line(), flush=True)
    print(export_edit(steer_dir, "control-vector", vector_gguf, all_positions=True, strength=1.0).line(), flush=True)

    pool = records("situational_questions", "test", trait=TRAIT) + records("neutral_questions", "test")
    prompts = [row["question"] for row in pool[: args.prompts]]
    prompt_ids = []
    for prompt in prompts:
        text, uses_template = render_chat(lm.tokenizer, build_messages(lm, prompt))
        prompt_ids.append(lm.tokenizer(text, add_special_tokens=not uses_template)["input_ids"])

    job = {"model": str(model_gguf), "vector": str(vector_gguf), "strength": args.strength, "n_ctx": 1024,
           "threads": os.cpu_count() or 2, "prompts": prompt_ids, "stops": stop_token_ids(lm),
           "max_new_tokens": args.max_new_tokens}
    (out / "job.json").write_text(json.dumps(job))
    (out / "llama_side.py").write_text(LLAMA_SIDE)
    start = time.perf_counter()
    subprocess.run([str(llama_python), str(out / "llama_side.py"), str(out / "job.json"), str(out / "llama.json")], check=True)
    llama_seconds = time.perf_counter() - start
    llama = json.loads((out / "llama.json").read_text())["results"]

    def everywhere(layer_shift: int = 0) -> ActivationEdit:
        return ActivationEdit(method="steer", base=steer.base, scale=steer.scale, interventions=tuple(
            Intervention(i.point, i.layer + layer_shift, i.values, i.indices, i.op, "all") for i in steer.interventions))

    def last_logits(edit=None) -> list[torch.Tensor]:
        rows = []
        for ids in prompt_ids:
            with torch.no_grad(), (edit.apply(lm, args.strength) if edit else contextlib.nullcontext()):
                rows.append(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float())
        return rows

    def diff(ours: list[torch.Tensor], theirs: list[list[float]]) -> float:
        return max(float((o - torch.tensor(t)).abs().max()) for o, t in zip(ours, theirs))

    layer = steer.interventions[0].layer
    logits = {
        "base": diff(last_logits(), llama["base"]["logits"]),
        f"vector vs steer at layer {layer}": diff(last_logits(everywhere(0)), llama["vector"]["logits"]),
        f"vector vs steer at layer {layer - 1}": diff(last_logits(everywhere(-1)), llama["vector"]["logits"]),
        f"vector vs steer at layer {layer + 1}": diff(last_logits(everywhere(1)), llama["vector"]["logits"]),
        "vector vs no steer": diff(last_logits(), llama["vector"]["logits"]),
    }

    def replies(edit=None) -> list[str]:
        if edit is None:
            return generate(lm, prompts, max_new_tokens=args.max_new_tokens)
        with edit.apply(lm, args.strength):
            return generate(lm, prompts, max_new_tokens=args.max_new_tokens)

    ours = {"base": replies(), "steer (generated positions)": replies(steer), "steer (all positions)": replies(everywhere(0))}
    decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    theirs = {"llama.cpp": [decode(r) for r in llama["base"]["replies"]],
              "llama.cpp + control vector": [decode(r) for r in llama["vector"]["replies"]]}
    same = {
        "base": sum(a == b for a, b in zip(ours["base"], theirs["llama.cpp"])) / len(prompts),
        "steer (all positions) vs control vector": sum(
            a == b for a, b in zip(ours["steer (all positions)"], theirs["llama.cpp + control vector"])) / len(prompts),
    }
    judge = TextJudge.load()
    scores = {name: [s[TRAIT] for s in judge.score(texts)] for name, texts in {**ours, **theirs}.items()}
    mean = {name: sum(v) / len(v) for name, v in scores.items()}
    shift = {
        "llama.cpp: control vector - none": mean["llama.cpp + control vector"] - mean["llama.cpp"],
        "personaedit: steer (generated positions) - none": mean["steer (generated positions)"] - mean["base"],
        "personaedit: steer (all positions) - none": mean["steer (all positions)"] - mean["base"],
    }
    results = {"strength": args.strength, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
               "layer": layer, "llama_cpp_seconds": llama_seconds, "last_position_logits_max_abs_diff": logits,
               "identical_greedy_replies": same, f"mean_{TRAIT}_score": mean, f"{TRAIT}_shift": shift,
               "same_sign": (shift["llama.cpp: control vector - none"] > 0) == (shift["personaedit: steer (generated positions) - none"] > 0),
               "replies": {**ours, **theirs}, "prompts_text": prompts}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for key in ("last_position_logits_max_abs_diff", "identical_greedy_replies", f"mean_{TRAIT}_score", f"{TRAIT}_shift"):
        print(key)
        for name, value in results[key].items():
            print(f"  {name:<52} {value:.4g}")
    print(f"same sign: {results['same_sign']}; llama.cpp side {llama_seconds:.1f} s; results -> {out / 'results.json'}")


if __name__ == "__main__":
    main()
