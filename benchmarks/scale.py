"""How the costs grow with the model: synthetic Llama-layout models from 135M to ~1B parameters (and 1.7B for the
merge alone), random weights, written as sharded safetensors into a temporary folder, with the default model's
tokenizer.

Per size, the merge runs in a fresh process, the model measurements in another that loads the model once; each
reports its peak RSS (VmHWM, reset before each measurement) and the RSS it started from (torch imported; for the
model measurements the model loaded and run once):
- merge: two rank-16 vectors on every linear weight (q/k/v/o/gate/up/down of every block) merged into the model
  (task arithmetic by default, `--merge-method ties` for TIES at density 0.3); time and peak. The engine streams tensors in blocks, so the goal is a peak flat in the
  model size: about three times the largest tensor plus a constant.
- capture: the residual stream at the middle half of the layers for 16 contrastive prompts (last token).
- steer fit and dpnle fit: `fit_edit` with 8 contrastive pairs (the defaults use 256 / 1000: the time per pair is
  what scales).
- generation: 4 prompts, exactly 16 new tokens, with and without the steer edit, interleaved (a warm-up round,
  then 3 timed repeats; medians).
- r-ROME: one edit of `down_proj` at the default layer, 10 optimisation steps and 2 prefixes (the defaults are
  25 and 5: fewer, so that the 1B model fits the time of a run on 2 shared cores; the trend is what is read).
Random weights make the texts meaningless; only time and memory are read here. The model measurements share one
process, and memory the allocator kept from an earlier measurement can serve a later one without raising the
resident set, so the table gives each measurement's absolute process peak next to the process with the model loaded
and run once, not a difference.

`--repeats N` runs each merge N times (fresh processes; the table gives medians, the JSON every run);
`--against DIR` runs each merge also with the personaedit of another source tree (DIR/src first on PYTHONPATH,
e.g. `git archive COMMIT src | tar -x -C DIR`), in turn with this one (A B A B ...), on the same models: before and
after a change to the merge, in one run.

Run: python benchmarks/scale.py [--sizes 135m,360m,1b,1.7b] [--merge-only 1.7b] [--plot docs/scale.png]
     [--json scale.json] [--repeats 3] [--against DIR]; python benchmarks/scale.py --from-json scale.json [--plot ...]
     prints a stored run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import row  # noqa: E402
from peers.peerlib import REPO, RSS_FUNCTION, fail, load_average, recorded  # noqa: E402

from personaedit.fileio import atomic_path, write_json_atomic  # noqa: E402

# Llama layouts (SmolLM2-135M, SmolLM2-360M, a TinyLlama-like 1.1B, SmolLM2-1.7B), the default model's vocabulary.
LAYOUTS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),  # a smoke test
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32),
}
VOCAB = 49152
MEASUREMENTS = ("merge", "capture", "steer", "dpnle", "generation", "rome")
TARGET_FLAT = 1.5  # issue 18: merge peak flat in model size; read as "largest/smallest peak <= 1.5x"

BUILD = r"""
import json, shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from personaedit.merge import model_folder
spec = json.loads(sys.argv[1])
out = Path(spec["out"])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=spec["vocab"], tie_word_embeddings=True, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, **spec["layout"])
default = model_folder("default")
base = json.loads((default / "config.json").read_text())
config.bos_token_id, config.eos_token_id, config.pad_token_id = base.get("bos_token_id"), base.get("eos_token_id"), base.get("pad_token_id")
with torch.device("cpu"):
    model = LlamaForCausalLM(config)  # initialised with std 0.02 normal weights
model.save_pretrained(out, max_shard_size="1GB")
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    if (default / name).exists():
        shutil.copy(default / name, out / name)
params = sum(p.numel() for p in model.parameters())
largest = max(p.numel() for p in model.parameters())
linear = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
print(json.dumps({"params": params, "largest": largest, "linear": linear,
                  "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}))
"""

VECTORS = r"""
import json, sys
from pathlib import Path
import torch
from personaedit.edits import BaseModelInfo, Delta, WeightEdit
from personaedit.persona import Persona
spec = json.loads(sys.argv[1])
info = BaseModelInfo(fingerprint="synthetic", spec=spec["base"], model_type="llama", layers=spec["layers"],
                     hidden_size=spec["hidden"], mlp_size=spec["mlp"])
for seed, persona in enumerate(("extraversion=high", "agreeableness=high")):
    gen = torch.Generator().manual_seed(seed)
    deltas = {name: Delta(u=0.03 * torch.randn(shape[0], 16, generator=gen), v=0.03 * torch.randn(shape[1], 16, generator=gen))
              for name, shape in spec["linear"]}
    WeightEdit(method="vector", persona=Persona.parse(persona), base=info, deltas=deltas).save(Path(spec["out"]) / f"vector-{seed}")
print("{}")
"""

# The merge in a fresh process (VmHWM is the process's own high-water mark: a fresh address space after exec).
MERGE = RSS_FUNCTION + r"""
import json, sys, time
import personaedit
from personaedit.merge import MergeConfig, merge
spec = json.loads(sys.argv[1])
floor = rss("VmHWM")
options = {"density": 0.3} if spec["method"] == "ties" else {}
config = MergeConfig(base=spec["base"], method=spec["method"], vectors=[{"path": p, "weight": 0.5} for p in spec["vectors"]],
                     **options)
start = time.perf_counter()
merge(config, spec["out"])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": rss("VmHWM"), "floor_mb": floor,
                  "personaedit": personaedit.__file__}))
"""

# The model measurements in one process that loads the model once: before each, the peak is reset to the current
# resident set (writing 5 to /proc/self/clear_refs, Linux >= 4.0), so each peak is its own.
MEASURE = RSS_FUNCTION + r"""
import contextlib, json, statistics, sys, time
import torch
from personaedit.data import records
from personaedit.methods import fit_edit
from personaedit.methods.capture import capture, render_prompts
from personaedit.methods.contrast import contrastive_pairs
from personaedit.models import generate, load_model
from personaedit.models.forward import encode_prompts
from personaedit.persona import BIG_FIVE
spec = json.loads(sys.argv[1])
torch.set_grad_enabled(False)
lm = load_model(spec["base"])
generate(lm, ["Hello."], max_new_tokens=2)  # pages the weights in: the floor is a model that has run once

def capture_once():
    capture(lm, contrastive_pairs(BIG_FIVE["extraversion"], 16).high,
            [("residual", l) for l in lm.arch.middle_layers(0.25, 0.75)], use_cache=False)

def rome():
    with torch.enable_grad():
        fit_edit("rome", lm, "tf=T", prompt="[Your answer] {} trust", subject="I", target="facts", steps=10, prefixes=2)

def generation():
    edit = fit_edit("steer", lm, "extraversion=high", pairs=8, layer=str(lm.arch.num_layers // 2))
    texts, templated = render_prompts(lm, [(None, r["question"]) for r in records("neutral_questions", "train")[:4]])
    batch = encode_prompts(lm, texts, add_special_tokens=not templated)
    rates = {"none": [], "steer": []}
    for repeat in range(4):  # interleaved; the first round warms up (its times are not kept)
        for name in rates:
            with edit.apply(lm) if name == "steer" else contextlib.nullcontext():
                began = time.perf_counter()
                lm.model.generate(**batch, max_new_tokens=16, min_new_tokens=16, do_sample=False, temperature=None,
                                  top_p=None, top_k=None, pad_token_id=lm.tokenizer.pad_token_id)
                if repeat:
                    rates[name].append(batch["input_ids"].shape[0] * 16 / (time.perf_counter() - began))
    return {"tok_s": statistics.median(rates["none"]), "tok_s_steer": statistics.median(rates["steer"]),
            "ratio": [s / n for s, n in zip(rates["steer"], rates["none"])]}

phases = {"capture": capture_once, "steer": lambda: fit_edit("steer", lm, "extraversion=high", pairs=8),
          "dpnle": lambda: fit_edit("dpnle", lm, "extraversion=high", pairs=8), "generation": generation, "rome": rome}
results = {}
for what in spec["measure"]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    floor = rss("VmRSS")
    start = time.perf_counter()
    extra = phases[what]()
    extra = extra if isinstance(extra, dict) else {}
    results[what] = {"seconds": time.perf_counter() - start, "peak_mb": rss("VmHWM"), "floor_mb": floor, **extra}
    print(f"  {what}: {results[what]['seconds']:.1f} s", file=sys.stderr, flush=True)
print(json.dumps(results))
"""


def child(code: str, spec: dict, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                          env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"a measuring process failed (exit {done.returncode}); its error is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_merges(spec: dict, out: Path, repeats: int, against: Path | None) -> dict:
    """The merge `repeats` times in fresh processes, this tree's and (with `against`) the other tree's in turn:
    {"merge": medians and every run[, "merge_against": the same for the other tree]}."""
    sides = {"merge": None, **({"merge_against": {"PYTHONPATH": str(against / "src")}} if against else {})}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, env in sides.items():
            run = child(MERGE, {**spec, "out": str(out)}, env=env)
            want = (against / "src") if env else REPO / "src"
            if not Path(run["personaedit"]).resolve().is_relative_to(want.resolve()):
                raise SystemExit(f"the merge imported {run['personaedit']}, not the personaedit of {want}")
            runs[name].append(run)
            shutil.rmtree(out, ignore_errors=True)
    return {name: {"seconds": statistics.median(r["seconds"] for r in found), "peak_mb": statistics.median(r["peak_mb"] for r in found),
                   "floor_mb": statistics.median(r["floor_mb"] for r in found), "runs": found}
            for name, found in runs.items()}


def measure_size(size: str, measurements: list[str], tmp: Path, merge_method: str, repeats: int = 1,
                 against: Path | None = None) -> dict:
    layout = LAYOUTS[size]
    folder = tmp / f"model-{size}"
    started = time.perf_counter()
    built = child(BUILD, {"out": str(folder), "layout": layout, "vocab": VOCAB})
    print(f"{size}: {built['params'] / 1e6:.0f}M parameters, {built['bytes'] / 2**20:.0f} MiB of safetensors, largest "
          f"tensor {built['largest'] / 1e6:.1f}M entries ({built['largest'] * 4 / 2**20:.0f} MiB), built in "
          f"{time.perf_counter() - started:.0f} s; load average {load_average()}", file=sys.stderr, flush=True)
    result = {"size": size, "merge_method": merge_method, "params": built["params"], "largest_mb": built["largest"] * 4 / 2**20,
              "model_mb": built["bytes"] / 2**20, "load": {"start": load_average()}}
    if "merge" in measurements:
        child(VECTORS, {"out": str(tmp), "base": str(folder), "linear": built["linear"], "layers": layout["num_hidden_layers"],
                        "hidden": layout["hidden_size"], "mlp": layout["intermediate_size"]})
        result.update(measure_merges({"base": str(folder), "vectors": [str(tmp / "vector-0"), str(tmp / "vector-1")],
                                      "method": merge_method}, tmp / f"merged-{size}", repeats, against))
    others = [m for m in measurements if m != "merge"]
    if others:
        # an empty cache folder: the fits collect their activations (a rerun would otherwise read them back)
        result.update(child(MEASURE, {"base": str(folder), "measure": others}, env={"PERSONAEDIT_CACHE": str(tmp / "cache")}))
        shutil.rmtree(tmp / "cache", ignore_errors=True)
    for what in [*measurements, *(["merge_against"] if "merge_against" in result else [])]:
        print(f"  {size} {what}: {result[what]['seconds']:.1f} s, peak {result[what]['peak_mb']:.0f} MiB "
              f"(from {result[what]['floor_mb']:.0f})", file=sys.stderr, flush=True)
    result["load"]["end"] = load_average()
    shutil.rmtree(folder, ignore_errors=True)
    for name in ("vector-0", "vector-1"):
        shutil.rmtree(tmp / name, ignore_errors=True)
    return result


def _cell(r: dict, what: str, peak: bool = False) -> str:
    if what not in r:
        return "—"
    m = r[what]
    if not peak:
        return f"{m['seconds']:.1f}"
    cell = f"{m['seconds']:.1f} / {m['peak_mb']:.0f}"
    if len(m.get("runs", [])) > 1:  # medians, with the range of the runs
        seconds, peaks = [x["seconds"] for x in m["runs"]], [x["peak_mb"] for x in m["runs"]]
        cell += f" ({min(seconds):.1f}–{max(seconds):.1f} s, {min(peaks):.0f}–{max(peaks):.0f} MiB)"
    return cell


def _loaded(r: dict) -> str:
    """The resident set of the measuring process with the model loaded and run once: the first model
    measurement's floor (later floors include what the allocator kept from earlier measurements)."""
    first = next((r[m] for m in MEASUREMENTS if m != "merge" and m in r), None)
    return "—" if first is None else f"{first['floor_mb']:.0f}"


def _generation_cell(r: dict) -> str:
    if "generation" not in r:
        return "—"
    g = r["generation"]
    return f"{g['tok_s']:.1f} / {g['tok_s_steer']:.1f} ({min(g['ratio']):.2f}–{max(g['ratio']):.2f})"


def report(results: list[dict]) -> None:
    print("| model | parameters | largest tensor | merge s / peak MiB | capture 16 prompts s | steer fit 8 pairs s "
          "| dpnle fit 8 pairs s | tok/s no edit / steer (ratio) | model loaded and run MiB | r-ROME s / process peak MiB "
          "| load average |")
    print("|" + "---|" * 11)
    for r in results:
        print(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['largest_mb']:.0f} MiB | {_cell(r, 'merge', True)} "
              f"| {_cell(r, 'capture')} | {_cell(r, 'steer')} | {_cell(r, 'dpnle')} | {_generation_cell(r)} "
              f"| {_loaded(r)} | {_cell(r, 'rome', True)} | {r['load']['start']} → {r['load']['end']} |")
    merged = [r for r in results if "merge" in r]
    if any("merge_against" in r for r in merged):
        print("\nthe same merges with the other source tree (--against), in turn with these:")
        for r in merged:
            if "merge_against" in r:
                a, b = r["merge"], r["merge_against"]
                print(f"    {r['size']}: other tree {_cell(r, 'merge_against', True)}; this tree {_cell(r, 'merge', True)}; "
                      f"this / other: time {a['seconds'] / b['seconds']:.2f}x, peak {a['peak_mb'] / b['peak_mb']:.2f}x")
        against = [r["merge_against"]["peak_mb"] for r in merged if "merge_against" in r]
        if len(against) >= 2:
            flat = max(against) / min(against)
            print(row("merge peak RSS, largest / smallest, other tree", f"{flat:.2f}x", f"<= {TARGET_FLAT}x", flat <= TARGET_FLAT))
    if len(merged) >= 2:
        peaks = [r["merge"]["peak_mb"] for r in merged]
        flat = max(peaks) / min(peaks)
        print(row("merge peak RSS, largest / smallest model", f"{flat:.2f}x", f"<= {TARGET_FLAT}x", flat <= TARGET_FLAT))
        for r in merged:
            bound = 3 * r["largest_mb"] + r["merge"]["floor_mb"]
            print(row(f"merge peak {r['size']} vs 3 x largest tensor + torch", f"{r['merge']['peak_mb']:.0f} MiB",
                      f"<= {bound:.0f} MiB", r["merge"]["peak_mb"] <= bound))
    for r in results:
        if "generation" in r:
            ratio = statistics.median(r["generation"]["ratio"])
            print(row(f"{r['size']}: steer-edited / unedited tok/s", f"{ratio:.2f}x", ">= 0.95x", ratio >= 0.95))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for what, label in (("merge", "merge"), ("capture", "capture, 16 prompts"), ("steer", "steer fit, 8 pairs"),
                        ("dpnle", "dpnle fit, 8 pairs"), ("rome", "r-ROME edit")):
        points = [(r["params"] / 1e6, r[what]) for r in results if what in r]
        if points:
            left.plot([p for p, _ in points], [m["seconds"] for _, m in points], "o-", label=label)
            right.plot([p for p, _ in points], [m["peak_mb"] for _, m in points], "o-", label=label)
    right.plot([r["params"] / 1e6 for r in results], [r["model_mb"] for r in results], "k--", label="model file")
    for axis, title in ((left, "wall time (s)"), (right, "peak RSS of the process (MiB)")):
        axis.set_xlabel("parameters (millions)")
        axis.set_title(title)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle("personaedit cost vs model size (synthetic Llama layouts, CPU, float32)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,360m,1b", help=f"comma-separated, from {', '.join(LAYOUTS)}")
    parser.add_argument("--merge-only", default="", help="sizes measured for the merge alone ('' for none)")
    parser.add_argument("--measure", default=",".join(MEASUREMENTS), help=f"from {', '.join(MEASUREMENTS)}")
    parser.add_argument("--merge-method", choices=("task_arithmetic", "ties"), default="task_arithmetic")
    parser.add_argument("--plot", type=Path, default=None, help="write the cost plot here (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--work", type=Path, default=None, help="folder for the synthetic models (default: under /tmp)")
    parser.add_argument("--repeats", type=int, default=1, help="merges per size, each in a fresh process (medians)")
    parser.add_argument("--against", type=Path, default=None,
                        help="also merge with the personaedit of this source tree (DIR/src), in turn with this one")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: print the table (and --plot) of the results a run wrote with --json")
    args = parser.parse_args()
    if args.from_json is not None:
        try:
            results = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as exc:
            fail(f"cannot read --from-json {args.from_json}: {exc}")
        print(f"the measurements {args.from_json} holds (not measured again)")
        report(results)
        if args.plot:
            plot(results, args.plot)
        return
    sizes = [s for s in args.sizes.split(",") if s]
    merge_only = [s for s in args.merge_only.split(",") if s]
    measurements = [m for m in args.measure.split(",") if m]
    bad = [s for s in sizes + merge_only if s not in LAYOUTS] + [m for m in measurements if m not in MEASUREMENTS]
    if bad:
        fail(f"unknown size or measurement {bad[0]!r} (sizes: {', '.join(LAYOUTS)}; measurements: {', '.join(MEASUREMENTS)})")
    if args.repeats < 1:
        fail("--repeats must be >= 1")
    if args.against is not None and not (args.against / "src" / "personaedit" / "merge").is_dir():
        fail(f"--against {args.against} is not a personaedit source tree (no src/personaedit/merge in it)")
    # kept in benchmarks/peers/results/scale[-MEASUREMENTS].txt: run.py --peers --stored prints its rows
    name = "scale" + ("" if measurements == list(MEASUREMENTS) else "-" + "+".join(measurements))
    with recorded(name + (f"-repeats{args.repeats}" if args.repeats > 1 else "") + ("-against" if args.against else "")):
        measure_all(args, sizes, merge_only, measurements)


def measure_all(args: argparse.Namespace, sizes: list[str], merge_only: list[str], measurements: list[str]) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.work) as tmp:
        for size in sizes:
            results.append(measure_size(size, measurements, Path(tmp), args.merge_method, args.repeats, args.against))
            if args.json:
                write_json_atomic(args.json, results)
        for size in merge_only:
            if "merge" in measurements:
                results.append(measure_size(size, ["merge"], Path(tmp), args.merge_method, args.repeats, args.against))
                if args.json:
                    write_json_atomic(args.json, results)
    report(results)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
