"""`personaedit`'s r-ROME against EasyEdit's R-ROME on the same requests of the default model, side by side.

EasyEdit is not on PyPI: pass a checkout (a working tree, or a git directory whose HEAD is exported) with
`--easyedit PATH`. Nothing of it is copied into this repository; its `easyeditor` package is imported from that
path in its own virtual environment (torch, then transformers as ours, datasets, matplotlib, PyYAML at EasyEdit's
pins), with the package's `__init__` files (which import every method and their extra dependencies) replaced by
empty packages so that only `easyeditor.models.r_rome` and what it imports load.

Both edit `down_proj` of layer 16 from the same `palette_queries` requests (the tf=T pole, one fresh edit per
request), EasyEdit with its R-ROME Llama hyperparameters (`hparams/R-ROME/llama3.2-3b.yaml`: 25 steps, lr 0.5,
weight decay 1e-3, clamp 4, KL 0.0625, no second-moment adjustment) with the layer and loss layer set for this
30-layer model, ours with its defaults. Each request is one process per tool, ours and EasyEdit's in turn;
measured inside it, after the model is loaded and has run once: the edit's wall time and the process's peak RSS
(VmHWM). Efficacy (the target is the greedy continuation of the edited query) and paraphrase efficacy are then
read for both edits by the same code (EasyEdit's ΔW applied as a dense weight edit).

`--ours-only` runs personaedit's side alone (EasyEdit's does not change with ours); `--against DIR` runs ours also
with the personaedit of another source tree (DIR/src first on PYTHONPATH, e.g. `git archive COMMIT src | tar -x -C
DIR`), in turn with this one: peak, time and efficacy before and after a change, on the same requests.

Run: python benchmarks/peers/easyedit_vs.py --easyedit PATH [--requests 4] [--work DIR]
     python benchmarks/peers/easyedit_vs.py --ours-only [--against DIR] [--requests 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))
from common import row  # noqa: E402
from peerlib import OUR_PYTHON, RSS_FUNCTION, ensure_venv, fail, load_average, ratio_row, recorded, run_json  # noqa: E402

EASYEDIT = ["transformers==5.24.0", "datasets==4.8.5", "matplotlib==3.10.7", "PyYAML==6.0.2", "numpy==2.2.6"]
LAYER, LOSS_LAYER = 16, 29
PERSONA = "tf=T"
TARGETS = {"seconds": 0.5}  # issue 18: r-ROME <= 0.5x EasyEdit's time (and <= 1 GB on the default model)

PEER = RSS_FUNCTION + r"""
import json, sys, time, types
from pathlib import Path
import torch, yaml
args = json.loads(sys.argv[1])
root = Path(args["easyedit"]) / "easyeditor"
for name, path in (("easyeditor", root), ("easyeditor.models", root / "models")):
    module = types.ModuleType(name); module.__path__ = [str(path)]; sys.modules[name] = module
from easyeditor.models.r_rome import R_ROMEHyperParams, apply_r_rome_to_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
config = yaml.safe_load(open(Path(args["easyedit"]) / "hparams" / "R-ROME" / "llama3.2-3b.yaml"))
config.update(model_name=args["model"], device="cpu", layers=[args["layer"]], v_loss_layer=args["loss_layer"],
              fp16=False, stats_dir=args["work"])
hparams = R_ROMEHyperParams(**R_ROMEHyperParams.construct_float_from_scientific_notation(config))
tok = AutoTokenizer.from_pretrained(args["model"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
with torch.no_grad():
    model(**tok(["I usually"], return_tensors="pt"))
floor = rss("VmRSS")
request = {"prompt": args["prompt"], "subject": args["subject"], "target_new": args["target"].strip()}
name = hparams.rewrite_module_tmp.format(args["layer"]) + ".weight"
before = dict(model.named_parameters())[name].detach().clone()
start = time.perf_counter()
model, _ = apply_r_rome_to_model(model, tok, [request], hparams, return_orig_weights=True)
seconds = time.perf_counter() - start
after = dict(model.named_parameters())[name].detach()
save_file({name: (after - before).contiguous()}, args["out"])
print(json.dumps({"seconds": seconds, "peak_mb": rss("VmHWM"), "floor_mb": floor, "param": name}))
"""

OURS = RSS_FUNCTION + r"""
import json, sys, time
import torch
from personaedit.data import records
from personaedit.edits import BaseModelInfo, Delta, WeightEdit, load_edit
from personaedit.methods import fit_edit
from personaedit.methods.locate import Request, efficacy
from personaedit.models import load_model
from personaedit.persona import Persona
args = json.loads(sys.argv[1])
persona = Persona.parse(args["persona"])
(dim,), ((_, level),) = persona.dimensions(), persona.levels
rows = records("palette_queries", dimension=dim.name, pole=dim.pole(level).name)[: args["requests"]]
queries = [Request.of(r["template"], r["subject"], r["target"]) for r in rows]
paraphrases = [Request.of(r["paraphrase"], r["subject"], r["target"]) for r in rows]
if args["mode"] == "requests":
    from personaedit.merge import model_folder  # only here: the edit process measures what an edit needs
    print(json.dumps({"model": str(model_folder("default")),
                      "requests": [{"prompt": q.template, "subject": q.subject, "target": q.target} for q in queries]}))
    sys.exit()
imported = rss("VmRSS")
lm = load_model("default")
if args["mode"] == "edit":
    loaded = rss("VmRSS")
    with torch.no_grad():
        lm.model(**lm.tokenizer(["I usually"], return_tensors="pt"))
    floor = rss("VmRSS")
    q = queries[args["index"]]
    start = time.perf_counter()
    edit = fit_edit("rome", lm, persona, prompt=q.template, subject=q.subject, target=q.target, layer=args["layer"])
    seconds = time.perf_counter() - start
    edit.save(args["out"])
    print(json.dumps({"seconds": seconds, "peak_mb": rss("VmHWM"), "floor_mb": floor, "imported_mb": imported,
                      "loaded_mb": loaded}))
    sys.exit()
from safetensors.torch import load_file

def edit_of(path):  # ours: a saved edit; EasyEdit's: its ΔW as a dense safetensors file
    if path.endswith(".safetensors"):
        return WeightEdit(method="rome", persona=persona, base=BaseModelInfo.of(lm),
                          deltas={name: Delta(dense=t) for name, t in load_file(path).items()})
    return load_edit(path)

hits = {"base": [efficacy(lm, queries), efficacy(lm, paraphrases)]}
for side, paths in args["edits"].items():
    hits[side] = [[], []]
    for i, path in enumerate(paths):
        with edit_of(path).apply(lm):
            hits[side][0] += efficacy(lm, [queries[i]])
            hits[side][1] += efficacy(lm, [paraphrases[i]])
print(json.dumps({side: [sum(h) / len(h) for h in pair] for side, pair in hits.items()}))
"""


def checkout(path: Path, work: Path) -> Path:
    """A working tree of EasyEdit: `path` itself, or HEAD of the git directory `path` exported into `work`."""
    if (path / "easyeditor").is_dir():
        return path
    tree = work / "easyedit"
    if not (tree / "easyeditor").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "--git-dir", str(path), "archive", "HEAD", "easyeditor", "hparams/R-ROME"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--easyedit", type=Path, default=os.environ.get("EASYEDIT"),
                        help="an EasyEdit checkout or git directory (or $EASYEDIT)")
    parser.add_argument("--requests", type=int, default=4, help="requests, one edit each (default 4; at most 16)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--ours-only", action="store_true",
                        help="run personaedit's edits only (EasyEdit's side unchanged since a stored run): time, peak, efficacy")
    parser.add_argument("--against", type=Path, default=None,
                        help="also edit with the personaedit of this source tree (DIR/src first on PYTHONPATH), in turn "
                             "with this one: before and after a change, on the same requests")
    args = parser.parse_args()
    if not args.ours_only and (args.easyedit is None or not Path(args.easyedit).exists()):
        fail("EasyEdit is not on PyPI: pass --easyedit PATH to a checkout of it (or set EASYEDIT), or --ours-only")
    if args.against is not None and not (args.against / "src" / "personaedit" / "methods").is_dir():
        fail(f"--against {args.against} is not a personaedit source tree (no src/personaedit/methods in it)")
    if not 1 <= args.requests <= 16:
        fail("--requests must be 1-16")
    with recorded("easyedit_vs" + ("-ours_only" if args.ours_only else "") + ("-against" if args.against else "")):
        compare(args)


def compare(args: argparse.Namespace) -> None:
    peer_python = None if args.ours_only else ensure_venv("easyedit", EASYEDIT)
    work = args.work or Path(tempfile.mkdtemp(prefix="easyedit-vs-"))
    # personaedit's sides: this tree, and with --against the other tree (its src first on PYTHONPATH)
    sides = {"ours": None, **({"against": {"PYTHONPATH": str(args.against / "src")}} if args.against else {})}
    try:
        work.mkdir(parents=True, exist_ok=True)
        tree = None if args.ours_only else checkout(Path(args.easyedit), work)
        inputs = run_json(OUR_PYTHON, OURS, json.dumps({"mode": "requests", "persona": PERSONA, "requests": args.requests}))
        print(f"{'personaedit only' if args.ours_only else f'EasyEdit from {args.easyedit}'}"
              f"{f'; against the personaedit of {args.against}' if args.against else ''}; {args.requests} {PERSONA} "
              f"requests, layer {LAYER}; load average {load_average()}", flush=True)
        runs: dict[str, list[dict]] = {side: [] for side in [*sides, *([] if args.ours_only else ["peer"])]}
        for i, request in enumerate(inputs["requests"]):
            for side, env in sides.items():
                runs[side].append(run_json(OUR_PYTHON, OURS, json.dumps({"mode": "edit", "persona": PERSONA, "requests": args.requests,
                                                                        "index": i, "layer": LAYER, "out": str(work / f"{side}-{i}")}),
                                           env=env))
            if not args.ours_only:
                runs["peer"].append(run_json(peer_python, PEER, json.dumps({
                    "easyedit": str(tree), "model": inputs["model"], "layer": LAYER, "loss_layer": LOSS_LAYER, "work": str(work),
                    "out": str(work / f"peer-{i}.safetensors"), **request})))
            print(f"  request {i + 1}: " + "; ".join(f"{side} {r[-1]['seconds']:.1f} s, peak {r[-1]['peak_mb']:.0f} MiB "
                                                     f"(loaded model {r[-1]['floor_mb']:.0f})" for side, r in runs.items()),
                  file=sys.stderr, flush=True)
        edits = {side: [str(work / f"{side}-{i}") for i in range(args.requests)] for side in sides}
        if not args.ours_only:
            edits["peer"] = [str(work / f"peer-{i}.safetensors") for i in range(args.requests)]
        rates = run_json(OUR_PYTHON, OURS, json.dumps({"mode": "efficacy", "persona": PERSONA, "requests": args.requests,
                                                       "edits": edits}))
        ours = runs["ours"]
        if not args.ours_only:
            peer = runs["peer"]
            print(ratio_row("r-ROME edit time, ours/EasyEdit", [a["seconds"] / b["seconds"] for a, b in zip(ours, peer)],
                            TARGETS["seconds"]))
            print(ratio_row("r-ROME process peak RSS, ours/EasyEdit", [a["peak_mb"] / b["peak_mb"] for a, b in zip(ours, peer)]))
            print(ratio_row("r-ROME peak above the loaded model, ours/EasyEdit",
                            [(a["peak_mb"] - a["floor_mb"]) / max(b["peak_mb"] - b["floor_mb"], 1) for a, b in zip(ours, peer)]))
        if args.against:
            before = runs["against"]
            print(ratio_row("r-ROME edit time, this tree / --against tree", [a["seconds"] / b["seconds"] for a, b in zip(ours, before)]))
            print(ratio_row("r-ROME process peak RSS, this tree / --against", [a["peak_mb"] / b["peak_mb"] for a, b in zip(ours, before)]))
            print(f"    --against tree: peak {max(r['peak_mb'] for r in before):.0f} MiB at most, "
                  f"{max(r['peak_mb'] - r['floor_mb'] for r in before):.0f} MiB above the loaded model at most")
        peak = max(r["peak_mb"] for r in ours)
        print(f"    this tree: peak {peak:.0f} MiB at most, {max(r['peak_mb'] - r['floor_mb'] for r in ours):.0f} MiB above the "
              f"loaded model at most (the loaded model and run once: {min(r['floor_mb'] for r in ours):.0f}–"
              f"{max(r['floor_mb'] for r in ours):.0f} MiB)")
        top = max(ours, key=lambda r: r["peak_mb"])
        print(f"    where this tree's largest peak lies: {top['imported_mb']:.0f} MiB with torch and personaedit "
              f"imported; {top['loaded_mb']:.0f} with the model loaded (its modelling code imported); {top['floor_mb']:.0f} "
              f"after one forward pass (the weights paged in); {top['peak_mb']:.0f} at the edit's peak")
        print(row("r-ROME process peak RSS, ours (largest)", f"{peak:.0f} MiB", "<= 1 GB", peak * 2**20 <= 1e9))
        labels = {"base": "no edit", "ours": "personaedit", "against": "personaedit --against", "peer": "EasyEdit"}
        for side in rates:
            print(f"    efficacy / paraphrase efficacy, {labels[side]}: {rates[side][0]:.2f} / {rates[side][1]:.2f}")
        if not args.ours_only:
            print(row("paraphrase efficacy, ours vs EasyEdit", f"{rates['ours'][1]:.2f} vs {rates['peer'][1]:.2f}", "ours >=",
                      rates["ours"][1] >= rates["peer"][1]))
        if args.against:
            same = rates["ours"] == rates["against"]
            print(row("efficacy and paraphrase efficacy, this tree vs --against", "same" if same else "differ", "same", same))
        print(f"load average at the end: {load_average()}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
