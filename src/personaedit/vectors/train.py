"""Personality vectors: fine-tune a copy of the model on dialogue in one persona, keep φ = θ_ft − θ_base.

Training runs on the HF Trainer, with LoRA (peft) or full fine-tuning, checkpoints in OUT/checkpoints and
resume from the last complete one. Under `accelerate launch` it runs in every process (DDP, or FSDP / DeepSpeed
from accelerate's config): each on its own device, distillation split between them, rank 0 alone writing.

Crash safety (`kill -9` at any moment): distilled examples are appended batch by batch to
OUT/examples.partial.jsonl and reused by the next run, then written whole to OUT/examples.jsonl; a checkpoint
counts only once a marker listing its files (written after the Trainer finished it) matches them, and
incomplete ones are removed before resuming; the vector's edit.json is removed before its tensors are
replaced and written back last, so a folder with edit.json always holds a whole vector. The vector is a WeightEdit
(method "vector") saved into OUT: low-rank factors u = scaling·B, v = Aᵀ per LoRA layer (in the
parameter's own layout), or dense differences after full fine-tuning. The base model is never touched.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from personaedit import distributed
from personaedit.edits import BaseModelInfo, Delta, WeightEdit, load_edit
from personaedit.edits.base import EDIT_JSON, TENSORS_FILE
from personaedit.errors import InputFileError, PersonaEditError
from personaedit.faults import fault_point
from personaedit.fileio import remove_stale_temporaries, write_json_atomic
from personaedit.models import LoadedModel
from personaedit.models.arch import is_transposed_linear
from personaedit.models.generation import ensure_pad_token, render_chat
from personaedit.models.loading import quiet_progress
from personaedit.persona import Persona
from personaedit.vectors.distill import Example, big5_chat_examples, distill, load_examples, save_examples

EXAMPLES_FILE = "examples.jsonl"
PARTIAL_EXAMPLES_FILE = "examples.partial.jsonl"
CHECKPOINT_MARKER = "personaedit-complete.json"
STAGED_VECTOR = ".staged-vector"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
Progress = Callable[[str, int, int], None]


@dataclass
class TrainedVector:
    """The vector and how it was made; `model` is the fine-tuned copy (LoRA still attached)."""

    edit: WeightEdit
    model: Any
    examples: int
    steps: int
    resumed_from: int
    train_loss: float | None
    seconds: float


def encode_example(tokenizer: Any, example: Example, max_length: int) -> dict[str, list[int]]:
    """Chat-formatted question (no system prompt) + reply (+ end of turn when the reply is whole); loss on the
    reply only."""
    text, uses_template = render_chat(tokenizer, [{"role": "user", "content": example.prompt}])
    prompt = tokenizer(text, add_special_tokens=not uses_template)["input_ids"]
    reply = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if example.ended and tokenizer.eos_token_id is not None:
        reply = reply + [tokenizer.eos_token_id]
    ids = (prompt + reply)[:max_length]
    labels = ([-100] * len(prompt) + reply)[:max_length]
    return {"input_ids": ids, "labels": labels}


def pad_right(pad_id: int) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """Right padding, so every row's real tokens start at position 0 (left padding would shift them)."""

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        fill = [width - len(r["input_ids"]) for r in rows]
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad_id] * f for r, f in zip(rows, fill)]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * f for r, f in zip(rows, fill)]),
            "labels": torch.tensor([r["labels"] + [-100] * f for r, f in zip(rows, fill)]),
        }

    return collate


def lora_deltas(peft_model: Any, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Delta]:
    """ΔW = scaling·B@A of every LoRA layer as factors in the wrapped parameter's layout. The factors are read
    from `state`, the peft model's whole state dict (gathered from the shards of FSDP or ZeRO-3), when given,
    else from the layers themselves."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Delta] = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        if state is None:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        else:
            a, b = (state[f"base_model.model.{name}.lora_{x}.default.weight"] for x in "AB")
        a = a.detach().float().cpu()  # [r, in]
        b = b.detach().float().cpu() * module.scaling["default"]  # [out, r]
        # Conv1D (GPT-2) stores weights as [in, out]: ΔW_param = (bA)ᵀ = Aᵀ bᵀ.
        u, v = (a.T, b) if module.fan_in_fan_out else (b, a.T)
        deltas[f"{name}.weight"] = Delta(u=u.contiguous(), v=v.contiguous())
    return deltas


def dense_deltas(tuned: torch.nn.Module | Mapping[str, torch.Tensor], base: torch.nn.Module) -> dict[str, Delta]:
    """θ_ft − θ_base of every parameter that changed; `tuned` is the fine-tuned model or its whole state dict
    (gathered from shards). Each difference is taken on the CPU, so the two may live on any devices."""
    tuned_params = tuned if isinstance(tuned, Mapping) else dict(tuned.named_parameters())
    deltas = {}
    for name, param in base.named_parameters():
        diff = tuned_params[name].detach().float().cpu() - param.detach().float().cpu()
        if diff.any():
            deltas[name] = Delta(dense=diff)
    return deltas


def _progress_callback(on_progress: Progress | None):
    from transformers import TrainerCallback

    class ReportSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if on_progress:
                on_progress("training", state.global_step, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if on_progress:
                on_progress("training", state.global_step, state.max_steps)
            fault_point("train.step")

        def on_save(self, args, state, control, **kwargs):
            # The Trainer calls this in every process once the checkpoint is written whole (weights, optimiser,
            # trainer state); each process writes its own RNG state (and shard), so rank 0 lists the files only
            # once all of them are here.
            distributed.wait_for_others()
            if state.is_world_process_zero:
                mark_checkpoint_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return ReportSteps()


def _checkpoint_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKPOINT_MARKER}


def mark_checkpoint_complete(folder: Path) -> None:
    """Record every file of a finished checkpoint with its size; the record's presence marks it complete."""
    write_json_atomic(folder / CHECKPOINT_MARKER, {"files": _checkpoint_files(folder)})


def checkpoint_complete(folder: Path) -> bool:
    """A checkpoint whose marker lists exactly the files it holds, at their sizes. A checkpoint from before
    the marker counts when its trainer state (written last by the Trainer) reads whole beside its weights and
    optimiser state."""
    marker = folder / CHECKPOINT_MARKER
    try:
        if marker.is_file():
            files = json.loads(marker.read_text(encoding="utf-8"))["files"]
            return bool(files) and _checkpoint_files(folder) == files
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    names = {p.name for p in folder.iterdir()}
    weights = any(n.endswith((".safetensors", ".bin")) for n in names)
    return isinstance(state, dict) and "global_step" in state and weights and "optimizer.pt" in names


def last_complete_checkpoint(folder: Path, remove_incomplete: bool = True) -> str | None:
    """The newest complete `checkpoint-N` in `folder` (None if none); incomplete ones (a run killed while
    saving) are removed, so neither a resume nor the Trainer's checkpoint rotation trips over them."""
    if not folder.is_dir():
        return None
    found = []
    for entry in folder.iterdir():
        name, _, step = entry.name.rpartition("-")
        if name != "checkpoint" or not step.isdigit() or not entry.is_dir():
            continue
        if checkpoint_complete(entry):
            found.append((int(step), entry))
        elif remove_incomplete:
            shutil.rmtree(entry, ignore_errors=True)
    return str(max(found)[1]) if found else None


def _check_run(out: Path, run: dict[str, Any]) -> None:
    """A folder resumes only the run it was started for. Only reads (every process checks, one writes)."""
    path = out / RUN_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous != run:
            changed = sorted(k for k in run if not isinstance(previous, dict) or previous.get(k) != run[k])
            raise InputFileError(f"{out} holds a training run with other settings ({', '.join(changed) or 'unreadable'}); "
                                 "use another --out or delete it")


def save_into(edit: WeightEdit, out: Path) -> None:
    """Write the edit's files into `out` beside the run's data: the old edit.json goes first, then the tensors
    replace the old ones, then edit.json is renamed in (its presence marks a complete vector). The files are
    made in `out`/.staged-vector, which a run killed meanwhile leaves for the next save to remove."""
    staged = out / STAGED_VECTOR
    shutil.rmtree(staged, ignore_errors=True)
    try:
        edit.save(staged)
        (out / EDIT_JSON).unlink(missing_ok=True)
        for name in (TENSORS_FILE, EDIT_JSON):
            if (staged / name).exists():
                os.replace(staged / name, out / name)
            elif name == TENSORS_FILE:
                (out / name).unlink(missing_ok=True)  # an edit without tensors: no stale ones beside it
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _remove_leftovers(out: Path) -> None:
    """What a killed earlier run left in `out`: a staged vector (and the temporary folders older versions used)."""
    shutil.rmtree(out / STAGED_VECTOR, ignore_errors=True)
    remove_stale_temporaries(out / STAGED_VECTOR)
    for entry in out.glob(".vector.*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _partial_file(cache: Path, process: int) -> Path:
    """Where one process appends its distilled batches: examples.partial.jsonl for rank 0 (and for a run without
    a launcher), examples.partial.N.jsonl for rank N."""
    return cache.with_name(PARTIAL_EXAMPLES_FILE if process == 0 else f"examples.partial.{process}.jsonl")


def _partial_files(cache: Path) -> list[Path]:
    return sorted(cache.parent.glob("examples.partial*.jsonl"))


def _wait_for_others(on_progress: Progress | None, what: str) -> None:
    """A barrier shown as a stage of its own: rank 0 may wait minutes for a slower process, and says so."""
    stage = f"waiting for the other processes {what}"
    if on_progress:
        on_progress(stage, 0, 1)
    distributed.wait_for_others()
    if on_progress:
        on_progress(stage, 1, 1)


def _examples(lm: LoadedModel, persona: Persona, cache: Path, big5_chat: str | Path | None, limit: int | None,
              samples_per_question: int, max_new_tokens: int, prompt_strength: float, seed: int,
              on_progress: Progress | None) -> list[Example]:
    """The cached examples, else Big5-Chat rows or distilled answers (then cached). Distillation appends each
    batch to examples.partial.jsonl beside the cache and resumes from it; the cache is written whole at the end.

    Under a launcher each process distils its share of the batches into its own partial file, reusing batches
    an earlier launch left in any of them; rank 0 then gathers every batch in order (the examples one process
    would make), writes the cache and removes the partial files, and the others read the cache."""
    processes, rank = distributed.world_size(), distributed.rank()
    examples = load_examples(cache) if cache.is_file() else None
    if examples is None:
        if big5_chat:
            examples = big5_chat_examples(big5_chat, persona, limit) if rank == 0 else []
        else:
            report = (lambda done, total: on_progress("distilling", done, total)) if on_progress else None
            settings: dict[str, Any] = dict(questions=limit, samples_per_question=samples_per_question,
                                            max_new_tokens=max_new_tokens, prompt_strength=prompt_strength, seed=seed)
            own = _partial_file(cache, rank)
            examples = distill(lm, persona, **settings, on_progress=report, partial=own, shard=(rank, processes),
                               reuse=[p for p in _partial_files(cache) if p != own])
            if processes > 1:
                _wait_for_others(on_progress, "to finish distilling")
                # every batch is in a partial file now: gathered in order, none made again
                examples = distill(lm, persona, **settings, partial=own,
                                   reuse=[p for p in _partial_files(cache) if p != own]) if rank == 0 else []
        if rank == 0:
            if not examples:
                raise InputFileError(f"no training examples for {persona.spec()}")
            save_examples(cache, examples)
        if processes > 1:
            distributed.wait_for_others()
            examples = examples if rank == 0 else load_examples(cache)
    if not examples:
        raise InputFileError(f"no training examples for {persona.spec()}")
    if rank == 0:
        for partial in _partial_files(cache):
            partial.unlink(missing_ok=True)
    return examples


def _refuse_ungatherable(trainer: Any) -> None:
    """DeepSpeed ZeRO-3 can hand over whole weights only when its config gathers them on save; say so before
    training rather than after it."""
    if not trainer.is_deepspeed_enabled:
        return
    zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise PersonaEditError("DeepSpeed ZeRO-3 keeps the weights in shards: set zero3_save_16bit_model: true in the "
                               "accelerate config (deepspeed_config) so the vector can be read from them")


def _trainable_copy(lm: LoadedModel, lora: dict[str, Any] | None) -> Any:
    """A copy of the model to fine-tune, wrapped with LoRA adapters unless `lora` is None (full)."""
    model = copy.deepcopy(lm.model)
    model.config.use_cache = False
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(**lora, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                            fan_in_fan_out=any(map(is_transposed_linear, model.modules())))
        model = get_peft_model(model, config)
    return model


def train_vector(
    lm: LoadedModel,
    persona: Persona | str,
    out: str | Path,
    *,
    big5_chat: str | Path | None = None,
    limit: int | None = 64,
    samples_per_question: int = 1,
    max_new_tokens: int = 64,
    prompt_strength: float = 1.5,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    target_modules: str = "all-linear",
    epochs: float = 2.0,
    learning_rate: float | None = None,
    batch_size: int = 8,
    grad_accumulation: int = 1,
    max_length: int = 256,
    save_steps: int = 10,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> TrainedVector:
    """Fine-tune a copy of `lm` on dialogue in `persona` (LoRA of `lora_rank`, or full when 0) and return
    φ as a WeightEdit, also saved into `out`. Re-running with the same `out` resumes the run.

    Data: `out`/examples.jsonl when present, else at most `limit` rows of `big5_chat` for the persona's
    pole, else the model's own answers under the persona prompt (at `prompt_strength`) to `limit` training
    questions drawn with `seed` (None or 0: all 128), `samples_per_question` each, `max_new_tokens` long.
    `on_progress(stage, done, total)` is called for the stages "distilling" and "training" (optimiser steps).

    Under a launcher (`accelerate launch`: DDP, or FSDP / DeepSpeed from its config) every process calls this
    with its own `lm` (on its own device): `batch_size` is the global batch, split evenly over the processes, so
    a run gives the vector one process gives; distillation is split by batches; rank 0 alone writes into `out`,
    and every process returns the saved vector. When the launcher shards the model (FSDP, DeepSpeed), `lm.model`
    is moved to the CPU once the examples are made: the trainable copy gets the accelerator's memory."""
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    class CheckpointingTrainer(Trainer):
        def save_model(self, output_dir=None, _internal_call=False):
            super().save_model(output_dir, _internal_call)
            if _internal_call:  # inside a checkpoint save: weights written, optimiser and trainer state not yet
                fault_point("train.checkpoint")

    persona = Persona.parse(persona)
    out = Path(out)
    processes, rank = distributed.world_size(), distributed.rank()
    if batch_size % processes:
        raise PersonaEditError(f"batch size {batch_size} is the global batch: it must split evenly over the "
                               f"{processes} processes")
    full = lora_rank <= 0
    learning_rate = learning_rate if learning_rate is not None else (2e-5 if full else 2e-3)
    source = f"big5-chat:{Path(big5_chat).name}" if big5_chat else "distilled"
    options: dict[str, Any] = {
        "source": source, "limit": limit, "samples_per_question": samples_per_question,
        "max_new_tokens": max_new_tokens, "prompt_strength": prompt_strength,
        "mode": "full" if full else "lora", "lora_rank": None if full else lora_rank,
        "lora_alpha": None if full else lora_alpha, "target_modules": None if full else target_modules,
        "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size,
        "grad_accumulation": grad_accumulation, "max_length": max_length, "seed": seed,
    }
    ours = (RUN_FILE, EXAMPLES_FILE)  # a run's record, or training examples put there to be used
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any((out / f).exists() for f in ours))):
        raise InputFileError(f"refusing to train into {out}: it exists and is not a personality vector folder")
    run = {"persona": persona.spec(), "model": lm.fingerprint, **options}
    _check_run(out, run)
    args = TrainingArguments(  # joins the launcher's process group, if there is one
        output_dir=str(out / CHECKPOINTS), num_train_epochs=epochs, per_device_train_batch_size=batch_size // processes,
        gradient_accumulation_steps=grad_accumulation, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=0.05, weight_decay=0.0, save_strategy="steps", save_steps=save_steps, save_total_limit=2,
        logging_strategy="no", report_to="none", disable_tqdm=True, log_level="error", log_level_replica="error",
        seed=seed, data_seed=seed, use_cpu=lm.device.type == "cpu", remove_unused_columns=False,
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
    )
    distributed.wait_for_others()  # every process has checked the folder before rank 0 writes into it
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        write_json_atomic(out / RUN_FILE, run)
        last_complete_checkpoint(Path(args.output_dir))  # removes incomplete ones (a run killed while saving)
    distributed.wait_for_others()

    examples = _examples(lm, persona, out / EXAMPLES_FILE, big5_chat, limit or None, samples_per_question, max_new_tokens,
                         prompt_strength, seed, on_progress)
    if distributed.sharded_training() and lm.device.type != "cpu":
        lm.model.to("cpu")  # kept for φ; FSDP / DeepSpeed place the trainable copy's shards on the accelerator
    tokenizer = lm.tokenizer
    dataset = [encode_example(tokenizer, e, max_length) for e in examples]

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # transformers' own deprecation notice from inside Trainer; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)  # LoRA's initialisation
        model = _trainable_copy(lm, None if full else dict(r=lora_rank, lora_alpha=lora_alpha, target_modules=target_modules))
        model.train()
        trainer = CheckpointingTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_right(ensure_pad_token(lm.tokenizer)),
                          callbacks=[_progress_callback(on_progress)])
        for printer in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(printer)  # library code never prints; the CLI shows a bar
        _refuse_ungatherable(trainer)
        last = last_complete_checkpoint(Path(args.output_dir), remove_incomplete=False)
        resumed_from = int(last.rsplit("-", 1)[-1]) if last else 0
        start = time.perf_counter()
        with quiet_progress():
            result = trainer.train(resume_from_checkpoint=last)
        seconds = time.perf_counter() - start
    model.eval()

    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    # FSDP / ZeRO-3 hold the weights in shards: every process takes part in gathering them, rank 0 gets them whole
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    edit = None
    if rank == 0 or not sharded:
        deltas = lora_deltas(model, state) if not full else dense_deltas(model if state is None else state, lm.model)
        edit = WeightEdit(method="vector", persona=persona, options={**options, "examples": len(examples),
                          "steps": trainer.state.global_step}, base=BaseModelInfo.of(lm), deltas=deltas)
    if rank == 0:
        save_into(edit, out)
    distributed.wait_for_others()  # the vector is in `out` before any process returns
    if edit is None:
        edit = load_edit(out)
    loss = result.training_loss if result.global_step > resumed_from else None
    if loss is not None and processes > 1:  # each process's loss is its share's: their mean is the whole batch's
        loss = float(trainer.accelerator.reduce(torch.tensor(loss, device=args.device), reduction="mean"))
    return TrainedVector(edit=edit, model=model, examples=len(examples), steps=trainer.state.global_step,
                         resumed_from=resumed_from, train_loss=loss, seconds=seconds)
