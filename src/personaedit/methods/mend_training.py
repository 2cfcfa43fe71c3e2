"""Training MEND's editor (`personaedit mend train`): edit examples from the project's opinions (or a
PersonalityEdit file), the editor's loss (the opinion's NLL after the update, asked plainly and paraphrased,
plus KL locality on another topic's opinion), and a resumable training loop with checkpoints.

The model itself is never changed: during training the update acts through hooks (ΔW x added to the
layer's output, `mend_editor.updated`) so that it stays differentiable in the editor.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from personaedit.data import records
from personaedit.data.external import EDIT_QUESTION, PARAPHRASES
from personaedit.errors import InputFileError
from personaedit.fileio import atomic_dir
from personaedit.methods.mend_editor import (EDITOR_JSON, MendEditor, TrainConfig, answer_logprobs_at, answer_nll,
                                             answer_sequence, default_editor_dir, gradient_factors, read_editor,
                                             updated, write_editor)
from personaedit.models.forward import frozen
from personaedit.models.loading import LoadedModel
from personaedit.progress import Progress


CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class EditExample:
    """An edit: the opinion `text` with `pole` of `trait` on `topic`."""

    topic: str
    trait: str
    pole: str
    text: str


def edit_examples(split: str = "train", data: str | Path | None = None) -> list[EditExample]:
    """Edit examples from the project's opinions (`split`), or from a PersonalityEdit file when `data` is given."""
    if data is not None:
        from personaedit.data.external import load_personality_edit, to_opinion_rows

        rows = to_opinion_rows(load_personality_edit(data))
    else:
        rows = records("opinions", split)
    examples = [EditExample(r["topic"], r["trait"], r["pole"], r["text"]) for r in rows if r.get("text")]
    if len({e.topic for e in examples}) < 2:
        raise InputFileError("MEND training needs opinions on at least two topics (one is edited, another checks locality)")
    return examples


def _calibrate(lm: LoadedModel, editor: MendEditor, examples: Sequence[EditExample]) -> None:
    """Input statistics for each layer's normalisation, and initial step sizes giving ‖ΔW‖ ≈ init_step·‖W‖."""
    config = editor.config
    chosen = random.Random(f"{config.seed}-calibration").sample(list(examples), min(config.calibration, len(examples)))
    per_edit = [gradient_factors(lm, editor.layers, [(EDIT_QUESTION.format(e.topic), e.text)]) for e in chosen]
    with torch.no_grad():
        for l in editor.layers:
            z = torch.cat([torch.cat([f[l][0], f[l][1]], -1) for f in per_edit])
            layer = editor.editors[str(l)]
            layer.mean.copy_(z.mean(0))
            layer.std.copy_(z.std(0).clamp(min=1e-8) if z.shape[0] > 1 else torch.ones_like(layer.std))
            weight_norm = float(lm.arch.mlp_out_weight(l).float().norm())
            grad_norms = [float((f[l][1].T @ f[l][0]).norm()) for f in per_edit]
            mean_grad = max(sum(grad_norms) / len(grad_norms), 1e-12)
            layer.log_step.fill_(float(torch.tensor(config.init_step * weight_norm / mean_grad).log()))


def _step_examples(examples: Sequence[EditExample], seed: int, step: int) -> tuple[EditExample, str, EditExample]:
    """The edit, its paraphrased question and a locality example on another topic; a function of (seed, step)
    alone, so a resumed run sees the same sequence."""
    rng = random.Random(f"{seed}-step-{step}")
    edit = rng.choice(examples)
    paraphrase = rng.choice(PARAPHRASES).format(edit.topic)
    other = rng.choice([e for e in examples if e.topic != edit.topic])
    return edit, paraphrase, other


def editor_loss(lm: LoadedModel, editor: MendEditor, edit: EditExample, paraphrase: str,
                other: EditExample) -> tuple[torch.Tensor, dict[str, float]]:
    """Edit NLL (edit question and paraphrase) + locality · KL(base ‖ edited) on another topic's opinion."""
    factors = gradient_factors(lm, editor.layers, [(EDIT_QUESTION.format(edit.topic), edit.text)])
    with frozen(lm.model):
        loc_ids, loc_where = answer_sequence(lm, EDIT_QUESTION.format(other.topic), other.text)
        with torch.no_grad():
            base = answer_logprobs_at(lm, loc_ids, loc_where)
        update = editor(factors)
        with updated(lm, update):
            nll = torch.stack([answer_nll(answer_logprobs_at(lm, ids, where), ids, where)
                               for ids, where in (answer_sequence(lm, EDIT_QUESTION.format(edit.topic), edit.text),
                                                  answer_sequence(lm, paraphrase, edit.text))]).mean()
            edited = answer_logprobs_at(lm, loc_ids, loc_where)
        kl = (base.exp() * (base - edited)).sum(-1).mean()
    loss = nll + editor.config.locality * kl
    return loss, {"edit_nll": float(nll.detach()), "locality_kl": float(kl.detach())}


def _save_checkpoint(directory: Path, editor: MendEditor, optimizer: torch.optim.Optimizer, step: int,
                     history: list[dict[str, float]]) -> None:
    with atomic_dir(directory / CHECKPOINT) as tmp:
        write_editor(tmp, editor, optimizer, {"step": step, "history": history})


def _load_checkpoint(directory: Path, editor: MendEditor, optimizer: torch.optim.Optimizer) -> tuple[int, list]:
    meta, tensors = read_editor(directory / CHECKPOINT)
    def settings(c: dict[str, Any]) -> dict[str, Any]:  # more steps or another checkpoint interval may resume
        return {k: v for k, v in c.items() if k not in ("steps", "checkpoint_every")}

    if settings(meta["config"]) != settings(asdict(editor.config)) or meta["fingerprint"] != editor.fingerprint:
        raise InputFileError(f"the checkpoint in {directory} was made with other settings or another model; "
                             "remove it or train into another folder")
    editor.load_state_dict({k.removeprefix("editor."): v for k, v in tensors.items() if k.startswith("editor.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta.get("history", []))


def train_editor(
    lm: LoadedModel,
    out: str | Path | None = None,
    config: TrainConfig = TrainConfig(),
    *,
    data: str | Path | None = None,
    resume: bool = True,
    on_progress: Progress | None = None,
) -> tuple[MendEditor, dict[str, Any]]:
    """Train (or resume training) the editor for `lm` on the training split's edit examples (or a
    PersonalityEdit file); save it in `out` (default: the cache folder for this model). Returns the
    editor and a summary (steps, seconds, losses at the start and the end)."""
    out = Path(out) if out is not None else default_editor_dir(lm)
    examples = edit_examples("train", data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        editor = MendEditor.for_model(lm, config).to(lm.device)
    optimizer = torch.optim.Adam(editor.parameters(), lr=config.lr)
    start, history = 0, []
    if resume and (out / CHECKPOINT / EDITOR_JSON).is_file():
        start, history = _load_checkpoint(out, editor, optimizer)
    else:
        _calibrate(lm, editor, examples)
    began = time.perf_counter()
    editor.train()
    for step in range(start, config.steps):
        loss, parts = editor_loss(lm, editor, *_step_examples(examples, config.seed, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"step": step, **parts})
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            _save_checkpoint(out, editor, optimizer, step + 1, history)
        if on_progress:
            on_progress(step + 1, config.steps)
    editor.eval()
    window = max(1, min(25, len(history) // 4))
    summary = {
        "steps": config.steps, "resumed_from": start, "seconds": round(time.perf_counter() - began, 1),
        "examples": len(examples), "layers": editor.layers, "step_sizes": editor.step_sizes(),
        "first": _mean(history[:window]), "last": _mean(history[-window:]),
    }
    editor.save(out, {"summary": summary, "history": history})
    return editor, summary


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = ("edit_nll", "locality_kl")
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys} if rows else {}
