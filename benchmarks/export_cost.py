"""Exports on the default model: time and size per format, and how faithful each is.

Fits (or reuses from OUT) a steer edit and a PALETTE edit for extraversion=high and a prompt edit, exports
them to every format they take, and checks:
- peft: `PeftModel.from_pretrained(base, folder)` logits against personaedit's own apply (max |diff|);
- control-vector: the file read back (gguf.GGUFReader) and applied as residual adds at every position against
  the steer edit applied at every position (steer's default acts on generated positions only; llama.cpp
  applies a control vector everywhere, hence --all-positions);
- gguf: the default model and the PALETTE-edited model written as GGUF (f32, f16, q8_0), read back by
  personaedit's own `.gguf` loader, logits against the model in memory.
Logits are compared over every position of three chat-formatted prompts (float32, CPU).
Run: python benchmarks/export_cost.py --out /tmp/export-bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from personaedit.edits import ActivationEdit, load_edit
from personaedit.edits.activation import Intervention
from personaedit.export import ExportError, export_edit, read_control_vector
from personaedit.export.base import human_size
from personaedit.methods import fit_edit
from personaedit.models import load_model
from personaedit.models.generation import render_chat

PROMPTS = ["What do you think of parties?", "How do you spend a free weekend?", "Describe your ideal job."]
PERSONA = "extraversion=high"


def batch(lm):
    texts = [render_chat(lm.tokenizer, [{"role": "user", "content": p}])[0] for p in PROMPTS]
    return [lm.tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in texts]


def logits_of(model, inputs):
    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in inputs]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def fitted(lm, out: Path, name: str, method: str, **options):
    folder = out / name
    if (folder / "edit.json").is_file():
        return load_edit(folder), None
    start = time.perf_counter()
    edit = fit_edit(method, lm, PERSONA, **options)
    seconds = time.perf_counter() - start
    edit.save(folder)
    return edit, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}

    lm = load_model("default", device="cpu", dtype="float32")
    inputs = batch(lm)
    base_logits = logits_of(lm.model, inputs)
    steer, steer_fit = fitted(lm, out, "steer", "steer")
    palette, palette_fit = fitted(lm, out, "palette", "palette")
    prompt, _ = fitted(lm, out, "prompt", "prompt")
    results["fit_seconds"] = {"steer": steer_fit, "palette": palette_fit}

    def run(label, source, fmt, target, **options):
        try:
            result = export_edit(source, fmt, out / target, **options)
        except ExportError as exc:
            rows.append((label, "refused", "", str(exc)))
            results[label] = {"refused": str(exc)}
            return None
        rows.append((label, f"{result.seconds:.2f} s", human_size(result.bytes), result.what))
        results[label] = {"seconds": result.seconds, "bytes": result.bytes, "what": result.what, "notes": result.notes}
        return result

    # peft
    run("steer -> peft", out / "steer", "peft", "steer-peft")
    run("palette -> peft", out / "palette", "peft", "palette-peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with palette.apply(lm, 1.0):
        own = logits_of(lm.model, inputs)
    base = AutoModelForCausalLM.from_pretrained(lm.source, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "palette-peft")).eval()
    results["palette -> peft"]["logits_max_abs_diff_vs_own_apply"] = max_diff(logits_of(adapted, inputs), own)
    results["palette -> peft"]["logits_max_abs_change_by_the_edit"] = max_diff(own, base_logits)
    del adapted, base

    # control vector
    run("steer -> control-vector", out / "steer", "control-vector", "steer.gguf")
    run("steer -> control-vector --all-positions", out / "steer", "control-vector", "steer.gguf", all_positions=True)
    vector = read_control_vector(out / "steer.gguf").to_edit()
    everywhere = ActivationEdit(method="steer", base=steer.base, scale=steer.scale, interventions=tuple(
        Intervention(i.point, i.layer, i.values, i.indices, i.op, "all") for i in steer.interventions))
    with vector.apply(lm, 1.0):
        from_file = logits_of(lm.model, inputs)
    with everywhere.apply(lm, 1.0):
        own = logits_of(lm.model, inputs)
    results["steer -> control-vector --all-positions"]["logits_max_abs_diff_vs_own_apply_at_all_positions"] = max_diff(from_file, own)

    # prompt
    run("prompt -> prompt", out / "prompt", "prompt", "prompt.json")

    # gguf: the default model, and the palette-edited model
    for dtype in ("f32", "f16", "q8_0"):
        label = f"default -> gguf {dtype}"
        if run(label, "default", "gguf", f"default-{dtype}.gguf", dtype=dtype):
            start = time.perf_counter()
            back = load_model(str(out / f"default-{dtype}.gguf"), device="cpu", dtype="float32")
            results[label]["read_back_seconds"] = time.perf_counter() - start
            results[label]["logits_max_abs_diff_vs_default"] = max_diff(logits_of(back.model, inputs), base_logits)
            del back
    label = "palette -> gguf f32"
    if run(label, out / "palette", "gguf", "palette-f32.gguf", dtype="f32"):
        back = load_model(str(out / "palette-f32.gguf"), device="cpu", dtype="float32")
        with palette.apply(lm, 1.0):
            own = logits_of(lm.model, inputs)
        results[label]["logits_max_abs_diff_vs_own_apply"] = max_diff(logits_of(back.model, inputs), own)

    for label, seconds, size, what in rows:
        print(f"{label:<42} {seconds:>10} {size:>10}  {what}")
    for label, entry in results.items():
        for key, value in (entry.items() if isinstance(entry, dict) else []):
            if "diff" in key or "change" in key:
                print(f"{label:<42} {key}: {value:.3g}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results -> {out / 'results.json'}")


if __name__ == "__main__":
    main()
