"""MEND's editor network (Mitchell et al., "Fast Model Editing at Scale", 2022): its layers, saving and
loading, the gradient factors of an edit example, and the update the editor makes of them.

For an edited `down_proj`-equivalent W_l (out × in) the fine-tuning gradient of an edit example is a sum of
rank-one terms, ∇W_l = Σ_t δ_t u_tᵀ: u_t is W_l's input at answer token t, δ_t the loss gradient w.r.t. its
output. A small MLP per layer maps each (u_t, δ_t) to (ũ_t, δ̃_t); the update is ΔW_l = −η_l Σ_t δ̃_t ũ_tᵀ,
with a learned step η_l. The MLP is residual (in normalised coordinates) with a zero-initialised output
layer, so an untrained editor is one step of gradient descent.

Training the editor: mend_training.py.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from personaedit.errors import EditError, InputFileError, PersonaEditError
from personaedit.models.scoring import prompt_ids
from personaedit.fileio import atomic_dir, give_usual_mode
from personaedit.models.forward import frozen
from personaedit.models.hooks import hooked
from personaedit.models.loading import LoadedModel, cache_dir

EDITOR_FORMAT = "personaedit-mend-editor"
EDITOR_FILE, EDITOR_JSON = "editor.safetensors", "editor.json"

Factors = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (u [T, in], δ [T, out])


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does; saved with the editor so that resuming uses the same settings."""

    layers: int = 3  # the last `layers` MLP output matrices are edited
    rank: int = 64  # hidden width of each layer's editor MLP
    steps: int = 300
    lr: float = 1e-4  # Adam, for the editor MLPs and the log step sizes
    locality: float = 1.0  # weight of the locality KL against the edit NLL
    init_step: float = 0.005  # initial ‖ΔW‖ / ‖W‖ of an untrained editor, averaged over calibration edits
    calibration: int = 16  # edit examples used for the input statistics and the initial step sizes
    seed: int = 0
    checkpoint_every: int = 50


# --------------------------------------------------------------------------------------------- data


# --------------------------------------------------------------------------------------------- network

class LayerEditor(nn.Module):
    """(u, δ) -> (ũ, δ̃) for one layer, plus that layer's learned step size."""

    def __init__(self, n_in: int, n_out: int, rank: int) -> None:
        super().__init__()
        width = n_in + n_out
        self.n_in = n_in
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        nn.init.zeros_(self.up.weight)  # identity at initialisation: the editor starts as plain gradient descent
        nn.init.zeros_(self.up.bias)
        self.log_step = nn.Parameter(torch.zeros(()))

    def forward(self, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ [T, in], −η·δ̃ [T, out]): ΔW = (−η δ̃)ᵀ ũ."""
        z = torch.cat([u, delta], -1)
        normed = (z - self.mean) / self.std
        z = z + self.up(torch.relu(self.down(normed))) * self.std
        return z[:, : self.n_in], -self.log_step.exp() * z[:, self.n_in:]


class MendEditor(nn.Module):
    """One LayerEditor per edited layer; knows which model it was trained for."""

    def __init__(self, layers: Sequence[int], n_in: int, n_out: int, config: TrainConfig, fingerprint: str) -> None:
        super().__init__()
        self.layers = list(layers)
        self.config = config
        self.fingerprint = fingerprint
        self.shape = (n_out, n_in)
        self.editors = nn.ModuleDict({str(l): LayerEditor(n_in, n_out, config.rank) for l in self.layers})

    @classmethod
    def for_model(cls, lm: LoadedModel, config: TrainConfig) -> "MendEditor":
        n = lm.arch.num_layers
        if not 1 <= config.layers <= n:
            raise PersonaEditError(f"MEND edits 1..{n} layers of this model, not {config.layers}")
        layers = list(range(n - config.layers, n))
        n_out, n_in = lm.arch.mlp_out_weight(layers[0]).shape
        return cls(layers, n_in, n_out, config, lm.fingerprint)

    def forward(self, factors: Factors) -> Factors:
        """Raw gradient factors -> update factors (ũ, −η δ̃) per layer."""
        return {l: self.editors[str(l)](u, d) for l, (u, d) in factors.items()}

    def step_sizes(self) -> dict[int, float]:
        return {l: float(self.editors[str(l)].log_step.detach().exp()) for l in self.layers}

    def check_fits(self, lm: LoadedModel) -> None:
        if self.fingerprint != lm.fingerprint:
            raise EditError(f"this MEND editor was trained for model fingerprint {self.fingerprint}, not {lm.fingerprint} ({lm.spec})")

    # --- saving ---------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"format": EDITOR_FORMAT, "layers": self.layers, "shape": list(self.shape),
                "fingerprint": self.fingerprint, "config": asdict(self.config)}

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            write_editor(tmp, self, None, {**(extra or {})})
        return directory

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "MendEditor":
        n_out, n_in = meta["shape"]
        return cls(meta["layers"], n_in, n_out, TrainConfig(**meta["config"]), meta["fingerprint"])


def write_editor(folder: Path, editor: MendEditor, optimizer: torch.optim.Optimizer | None, extra: dict[str, Any]) -> None:
    tensors = {f"editor.{k}": v.detach().cpu().contiguous() for k, v in editor.state_dict().items()}
    meta = {**editor.meta(), **extra}
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, slots in state["state"].items():
            for key, value in slots.items():
                tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        meta["param_groups"] = state["param_groups"]
    save_file(tensors, str(folder / EDITOR_FILE), metadata={"format": EDITOR_FORMAT})
    give_usual_mode(folder / EDITOR_FILE)
    (folder / EDITOR_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_editor(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        meta = json.loads((folder / EDITOR_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / EDITOR_FILE))
    except (OSError, ValueError) as exc:
        raise InputFileError(f"{folder} holds no readable MEND editor ({exc})") from None
    if meta.get("format") != EDITOR_FORMAT:
        raise InputFileError(f"{folder} is not a MEND editor folder")
    return meta, tensors


def load_editor(directory: str | Path, lm: LoadedModel | None = None) -> MendEditor:
    """An editor saved by `train_editor` (refused for a model with another fingerprint)."""
    meta, tensors = read_editor(Path(directory))
    editor = MendEditor.from_meta(meta)
    editor.load_state_dict({k.removeprefix("editor."): v for k, v in tensors.items() if k.startswith("editor.")})
    if lm is not None:
        editor.check_fits(lm)
        editor.to(lm.device)
    return editor.eval()


def default_editor_dir(lm: LoadedModel) -> Path:
    """Where `personaedit mend train` keeps the editor of this model (the cache, keyed by fingerprint)."""
    return cache_dir() / "mend" / lm.fingerprint


def has_editor(directory: str | Path) -> bool:
    return (Path(directory) / EDITOR_JSON).is_file()


# --------------------------------------------------------------------------------------------- forward passes

def answer_sequence(lm: LoadedModel, question: str, answer: str) -> tuple[torch.Tensor, slice]:
    """Token ids [1, n] of the chat-rendered question + answer, and the positions whose logits predict the answer."""
    prompt = prompt_ids(lm, question)
    reply = list(lm.tokenizer(answer, add_special_tokens=False)["input_ids"])
    if not reply:
        raise InputFileError(f"an empty answer cannot be edited towards (question {question!r})")
    ids = torch.tensor([prompt + reply], dtype=torch.long, device=lm.device)
    return ids, slice(len(prompt) - 1, len(prompt) + len(reply) - 1)


def answer_logprobs_at(lm: LoadedModel, ids: torch.Tensor, where: slice) -> torch.Tensor:
    """Log-distributions [n_answer, vocab] at the answer positions."""
    return lm.model(input_ids=ids).logits[0, where].float().log_softmax(-1)


def answer_nll(logprobs: torch.Tensor, ids: torch.Tensor, where: slice) -> torch.Tensor:
    targets = ids[0, where.start + 1: where.stop + 1]
    return -logprobs.gather(1, targets[:, None]).mean()


@contextlib.contextmanager
def _probed(lm: LoadedModel, layers: Sequence[int], inputs: dict[int, torch.Tensor],
            probes: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record each layer's MLP-output input and add a zero probe to its output, whose gradient is δ."""
    def record(l: int):
        def fn(x: torch.Tensor) -> None:
            inputs[l] = x.detach()
        return fn

    def probe(l: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            probes[l] = torch.zeros_like(h, requires_grad=True)
            return h + probes[l]
        return fn

    with hooked(lm.arch, [("mlp_hidden", l, record(l)) for l in layers] + [("mlp_out", l, probe(l)) for l in layers]):
        yield


@contextlib.contextmanager
def updated(lm: LoadedModel, update: Factors) -> Iterator[None]:
    """Run the model as if W_l += Σ_t a_t b_tᵀ for (b [T, in], a [T, out]) = update[l], differentiably."""
    stash: dict[int, torch.Tensor] = {}

    def stash_input(l: int):
        def fn(x: torch.Tensor) -> None:
            stash[l] = x
        return fn

    def add(l: int):
        b, a = update[l]

        def fn(h: torch.Tensor) -> torch.Tensor:
            return h + ((stash[l].to(b.dtype) @ b.T) @ a).to(h.dtype)
        return fn

    with hooked(lm.arch, [("mlp_hidden", l, stash_input(l)) for l in update] + [("mlp_out", l, add(l)) for l in update]):
        yield


def gradient_factors(lm: LoadedModel, layers: Sequence[int], pairs: Sequence[tuple[str, str]]) -> Factors:
    """Per layer (u [T, in], δ [T, out]) at the answer positions of the (question, answer) pairs: the
    fine-tuning gradient of the mean answer NLL w.r.t. W_l is Σ_t δ_t u_tᵀ. One forward and one backward
    (through the edited layers only) per pair."""
    collected: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {l: [] for l in layers}
    with frozen(lm.model), torch.enable_grad():
        for question, answer in pairs:
            inputs: dict[int, torch.Tensor] = {}
            probes: dict[int, torch.Tensor] = {}
            ids, where = answer_sequence(lm, question, answer)
            with _probed(lm, layers, inputs, probes):
                loss = answer_nll(answer_logprobs_at(lm, ids, where), ids, where) / len(pairs)
            grads = torch.autograd.grad(loss, [probes[l] for l in layers])
            for l, grad in zip(layers, grads):
                collected[l].append((inputs[l][0, where].float(), grad[0, where].float()))
    return {l: (torch.cat([u for u, _ in parts]), torch.cat([d for _, d in parts])) for l, parts in collected.items()}


def update_factors(editor: MendEditor, factors: Factors) -> Factors:
    """The editor's (ũ, −η δ̃) for raw gradient factors (no gradient kept)."""
    with torch.no_grad():
        return editor(factors)


# --------------------------------------------------------------------------------------------- training


