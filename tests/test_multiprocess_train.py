"""`vector train` in two processes under `accelerate launch` (DDP, gloo on CPU) on a tiny model.

Two processes with the same global batch train the vector one process trains (to float tolerance), and a run killed
(SIGKILL at named fault points: while distilling, while training) resumes across launches. `accelerate launch --cpu
--num_processes 2` starts one process (accelerate spawns several CPU processes only through --mpirun_hostfile), so
the test starts two with `--multi_gpu` and no visible GPU: torchrun's launcher, gloo on the CPU, on a free loopback
port. About 20 s on 2 idle cores (60 s under load 8), mostly the start-up of three Python processes per launch.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personaedit import distributed
from personaedit.edits import load_edit
from personaedit.models import load_model
from personaedit.models.loading import pick_device
from personaedit.vectors import train_vector
from personaedit.persona import Persona
from personaedit.vectors.distill import distill
from personaedit.vectors.deltas import dense_deltas, lora_deltas
from personaedit.vectors.folder import checkpoint_complete
from personaedit.vectors.train import _trainable_copy
from test_loading import save_tiny
from tiny import tiny_lm

# 40 questions: distillation batches of 16, 16 and 8 (rank 0 makes the first and third, rank 1 the second); 40
# examples in global batches of 8 (4 per process): 5 optimiser steps, a checkpoint every 2.
SETTINGS = dict(limit=40, max_new_tokens=4, batch_size=8, epochs=1, save_steps=2, lora_rank=2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(root: Path, args: list[str], fault: str | None = None) -> tuple[int, str]:
    """(exit status, stderr) of `accelerate launch` starting two CPU processes of `personaedit ARGS`."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PERSONAEDIT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
           "COLUMNS": "200"}
    for name in ("PERSONAEDIT_FAULT_AT", "ACCELERATE_USE_CPU", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if fault:
        env["PERSONAEDIT_FAULT_AT"] = fault
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "personaedit", *args]
    proc = subprocess.run(command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr


def killed(result: tuple[int, str]) -> None:
    code, err = result
    assert code != 0 and f"Signal {int(signal.SIGKILL)} (SIGKILL)" in err, f"not killed at the fault point: {err[-3000:]}"


def test_two_processes_train_the_one_process_vector_and_resume_after_kill_9(tmp_path):
    model = save_tiny(tmp_path / "model")
    reference = tmp_path / "one-process"
    train_vector(load_model(str(model)), "extraversion=high", reference, **SETTINGS)
    out = tmp_path / "two-processes"
    args = ["vector", "train", "--model", str(model), "--persona", "extraversion=high", "--out", str(out),
            *[part for key, value in SETTINGS.items() for part in (f"--{key.replace('_', '-')}", str(value))]]

    killed(launch(tmp_path, args, fault="distill.batch:1"))  # each process dies after its first batch
    assert not (out / "examples.jsonl").exists() and not (out / "edit.json").exists()
    partial = sorted(p.name for p in out.glob("examples.partial*.jsonl"))
    assert partial and set(partial) <= {"examples.partial.jsonl", "examples.partial.1.jsonl"}
    made = [len((out / name).read_text().splitlines()) - 1 for name in partial]  # the settings line, then batches
    assert all(n <= 1 for n in made) and sum(made) >= 1

    killed(launch(tmp_path, args, fault="train.step:3"))  # checkpoint-2 is whole, step 3 is lost
    assert (out / "examples.jsonl").read_bytes() == (reference / "examples.jsonl").read_bytes()
    assert not list(out.glob("examples.partial*.jsonl"))
    assert checkpoint_complete(out / "checkpoints" / "checkpoint-2") and not (out / "edit.json").exists()

    code, err = launch(tmp_path, args)
    assert code == 0, err[-3000:]
    assert err.count("saved personality vector") == 1 and "resumed at step 2" in err  # rank 0 alone reports
    saved, expected = load_file(out / "tensors.safetensors"), load_file(reference / "tensors.safetensors")
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(saved[name], tensor, atol=1e-5), name
    assert max(float(t.abs().max()) for t in expected.values()) > 1e-2  # training moved the factors
    assert load_edit(out).options["steps"] == 5
    assert json.loads((out / "run.json").read_text())["batch_size"] == 8  # the global batch, as one process had it


# --- the pieces, in one process -----------------------------------------------------------------

def test_shares_of_distillation_add_up_to_one_processes_examples(tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    settings = dict(questions=40, max_new_tokens=4, seed=3)
    persona = Persona.parse("extraversion=high")
    whole = distill(lm, persona, **settings)
    first = distill(lm, persona, **settings, shard=(0, 2), partial=tmp_path / "p0.jsonl")
    second = distill(lm, persona, **settings, shard=(1, 2), partial=tmp_path / "p1.jsonl")
    assert len(first) + len(second) == len(whole)

    def no_generation(*args, **kwargs):
        raise AssertionError("a batch was made again")

    monkeypatch.setattr(importlib.import_module("personaedit.vectors.distill"), "generate", no_generation)
    gathered = distill(lm, persona, **settings, partial=tmp_path / "p0.jsonl", reuse=[tmp_path / "p1.jsonl"])
    assert gathered == whole


def test_deltas_read_from_a_whole_state_dict_equal_those_read_from_the_layers():
    lm = tiny_lm("gpt2")  # Conv1D: the transposed layout
    lora = _trainable_copy(lm, dict(r=2, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()
    from_layers, from_state = lora_deltas(lora), lora_deltas(lora, lora.state_dict())
    assert from_layers.keys() == from_state.keys() and from_layers
    assert all(torch.equal(from_layers[k].u, from_state[k].u) and torch.equal(from_layers[k].v, from_state[k].v)
               for k in from_layers)
    full = _trainable_copy(lm, None)
    with torch.no_grad():
        next(full.parameters()).add_(1.0)
    by_module, by_state = dense_deltas(full, lm.model), dense_deltas(full.state_dict(), lm.model)
    assert list(by_module) == list(by_state) and len(by_module) == 1
    assert torch.equal(next(iter(by_module.values())).dense, next(iter(by_state.values())).dense)


def test_a_launcher_gives_each_process_its_own_gpu_and_cpu_when_asked(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device() == torch.device("cuda") and pick_device("cuda") == torch.device("cuda")  # no launcher
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank() == 3 and distributed.local_rank() == 1 and not distributed.is_main()
    assert pick_device() == torch.device("cuda", 1) and pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0) and pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(Exception, match="LOCAL_RANK.*2 CUDA device"):
        pick_device()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert pick_device() == torch.device("cpu")


def test_accelerate_launch_cpu_starting_one_process_is_recognised(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert not distributed.single_cpu_process_of_many()  # --num_processes 1: no rendezvous address
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert distributed.single_cpu_process_of_many() and distributed.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not distributed.single_cpu_process_of_many()
