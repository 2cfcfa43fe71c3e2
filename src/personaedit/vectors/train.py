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
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from personaedit import distributed
from personaedit.edits import BaseModelInfo, WeightEdit, load_edit
from personaedit.errors import InputFileError, PersonaEditError
from personaedit.faults import fault_point
from personaedit.fileio import write_json_atomic
from personaedit.models import LoadedModel
from personaedit.models.arch import is_transposed_linear
from personaedit.models.generation import ensure_pad_token, render_chat
from personaedit.models.loading import quiet_progress
from personaedit.persona import Persona
from personaedit.progress import StagedProgress
from personaedit.vectors.deltas import dense_deltas, lora_deltas
from personaedit.vectors.distill import Example, big5_chat_examples, distill, load_examples, save_examples
from personaedit.vectors.folder import CHECKPOINTS, RUN_FILE, check_run, last_complete_checkpoint, \
    mark_checkpoint_complete, remove_leftovers, save_into
from personaedit.vectors.options import TrainOptions

EXAMPLES_FILE = "examples.jsonl"
PARTIAL_EXAMPLES_FILE = "examples.partial.jsonl"


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


def _progress_callback(on_progress: StagedProgress | None):
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


def _partial_file(cache: Path, process: int) -> Path:
    """Where one process appends its distilled batches: examples.partial.jsonl for rank 0 (and for a run without
    a launcher), examples.partial.N.jsonl for rank N."""
    return cache.with_name(PARTIAL_EXAMPLES_FILE if process == 0 else f"examples.partial.{process}.jsonl")


def _partial_files(cache: Path) -> list[Path]:
    return sorted(cache.parent.glob("examples.partial*.jsonl"))


def _wait_for_others(on_progress: StagedProgress | None, what: str) -> None:
    """A barrier shown as a stage of its own: rank 0 may wait minutes for a slower process, and says so."""
    stage = f"waiting for the other processes {what}"
    if on_progress:
        on_progress(stage, 0, 1)
    distributed.wait_for_others()
    if on_progress:
        on_progress(stage, 1, 1)


def _examples(lm: LoadedModel, persona: Persona, cache: Path, config: TrainOptions,
              on_progress: StagedProgress | None) -> list[Example]:
    """The cached examples, else Big5-Chat rows or distilled answers (then cached). Distillation appends each
    batch to examples.partial.jsonl beside the cache and resumes from it; the cache is written whole at the end.

    Under a launcher each process distils its share of the batches into its own partial file, reusing batches
    an earlier launch left in any of them; rank 0 then gathers every batch in order (the examples one process
    would make), writes the cache and removes the partial files, and the others read the cache."""
    processes, rank = distributed.world_size(), distributed.rank()
    examples = load_examples(cache) if cache.is_file() else None
    if examples is None:
        if config.big5_chat:
            examples = big5_chat_examples(config.big5_chat, persona, config.limit or None) if rank == 0 else []
        else:
            report = (lambda done, total: on_progress("distilling", done, total)) if on_progress else None
            settings: dict[str, Any] = dict(
                questions=config.limit or None, samples_per_question=config.samples_per_question,
                max_new_tokens=config.max_new_tokens, prompt_strength=config.prompt_strength, seed=config.seed)
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
    config: TrainOptions = TrainOptions(),
    *,
    on_progress: StagedProgress | None = None,
    **options: Any,
) -> TrainedVector:
    """Fine-tune a copy of `lm` on dialogue in `persona` (LoRA of `lora_rank`, or full when 0) and return
    φ as a WeightEdit, also saved into `out`. Re-running with the same `out` resumes the run. The run's settings
    are `config` (TrainOptions) with any of its fields given one by one in `options` (`lora_rank=4, epochs=1`).

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

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TrainOptions)})
    if unknown:
        raise TypeError(f"train_vector has no option {unknown[0]!r}")
    config = dataclasses.replace(config, **options)
    persona = Persona.parse(persona)
    out = Path(out)
    processes, rank = distributed.world_size(), distributed.rank()
    if config.batch_size % processes:
        raise PersonaEditError(f"batch size {config.batch_size} is the global batch: it must split evenly over the "
                               f"{processes} processes")
    full = config.full
    learning_rate = config.learning_rate if config.learning_rate is not None else (2e-5 if full else 2e-3)
    source = f"big5-chat:{Path(config.big5_chat).name}" if config.big5_chat else "distilled"
    recorded: dict[str, Any] = {
        "source": source, "limit": config.limit, "samples_per_question": config.samples_per_question,
        "max_new_tokens": config.max_new_tokens, "prompt_strength": config.prompt_strength,
        "mode": "full" if full else "lora", "lora_rank": None if full else config.lora_rank,
        "lora_alpha": None if full else config.lora_alpha,
        "target_modules": None if full else config.target_modules,
        "epochs": config.epochs, "learning_rate": learning_rate, "batch_size": config.batch_size,
        "grad_accumulation": config.grad_accumulation, "max_length": config.max_length, "seed": config.seed,
    }
    ours = (RUN_FILE, EXAMPLES_FILE)  # a run's record, or training examples put there to be used
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any((out / f).exists() for f in ours))):
        raise InputFileError(f"refusing to train into {out}: it exists and is not a personality vector folder")
    run = {"persona": persona.spec(), "model": lm.fingerprint, **recorded}
    check_run(out, run)
    args = TrainingArguments(  # joins the launcher's process group, if there is one
        output_dir=str(out / CHECKPOINTS), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size // processes,
        gradient_accumulation_steps=config.grad_accumulation, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=0.05, weight_decay=0.0, save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        logging_strategy="no", report_to="none", disable_tqdm=True, log_level="error", log_level_replica="error",
        seed=config.seed, data_seed=config.seed, use_cpu=lm.device.type == "cpu", remove_unused_columns=False,
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
    )
    distributed.wait_for_others()  # every process has checked the folder before rank 0 writes into it
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
        write_json_atomic(out / RUN_FILE, run)
        last_complete_checkpoint(Path(args.output_dir))  # removes incomplete ones (a run killed while saving)
    distributed.wait_for_others()

    examples = _examples(lm, persona, out / EXAMPLES_FILE, config, on_progress)
    if distributed.sharded_training() and lm.device.type != "cpu":
        lm.model.to("cpu")  # kept for φ; FSDP / DeepSpeed place the trainable copy's shards on the accelerator
    tokenizer = lm.tokenizer
    dataset = [encode_example(tokenizer, e, config.max_length) for e in examples]

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # transformers' own deprecation notice from inside Trainer; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(config.seed)  # LoRA's initialisation
        lora = dict(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.target_modules)
        model = _trainable_copy(lm, None if full else lora)
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
        edit = WeightEdit(method="vector", persona=persona, options={**recorded, "examples": len(examples),
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
