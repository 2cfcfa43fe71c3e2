"""A merge described as data: from CLI options or a YAML file, validated once.

```yaml
base: default                 # MODEL: default | HF folder | .gguf | cached hub id
method: ties                  # task_arithmetic | ties | dare_linear | dare_ties
density: 0.3                  # ties only: share of entries kept per vector
normalize: true               # ties, dare_ties: mean over agreeing vectors (true, count), their sum (false, none),
                              # or weight-sum: divided by the agreeing vectors' weight sum (mergekit's; flips negation)
drop: 0.5                     # dare_*: drop probability
seed: 0                       # dare_*
max_shard_size: 2GB
vectors:                      # paths relative to this file
  - {path: vectors/extraversion, weight: 0.5}
  - {path: vectors/agreeableness, weight: -0.3}
out: merged                   # optional; --out wins
```
Options a method does not use are refused, so nothing is silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from personaedit.errors import InputFileError, PersonaEditError
from personaedit.merge.methods import MergeOptions, get_merge_method, normalize_mode
from personaedit.preflight import finite_number

DEFAULT_SHARD_SIZE = "2GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB', '500MiB', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise PersonaEditError(f"cannot read size {text!r} (e.g. 2GB, 500MB, 1GiB)")
        try:
            size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
        except ValueError:
            raise PersonaEditError(f"cannot read size {text!r} (e.g. 2GB, 500MB, 1GiB)") from None
    if size <= 0:
        raise PersonaEditError(f"size must be positive, got {text!r}")
    return size


class VectorRef(BaseModel):
    """A personality vector folder and the weight it enters the merge with."""

    model_config = ConfigDict(extra="forbid")
    path: Path
    weight: float = 1.0


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = "default"
    method: str = "task_arithmetic"
    vectors: list[VectorRef] = Field(min_length=1)
    density: Optional[float] = Field(None, gt=0, le=1)
    drop: Optional[float] = Field(None, ge=0, lt=1)
    normalize: Optional[Union[bool, str]] = None
    seed: Optional[int] = None
    max_shard_size: str | int = DEFAULT_SHARD_SIZE
    out: Optional[Path] = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        get_merge_method(name)
        return name

    @field_validator("normalize")
    @classmethod
    def _normalize(cls, value: Optional[Union[bool, str]]) -> Optional[Union[bool, str]]:
        if value is None:
            return None
        try:
            return normalize_mode(value)
        except PersonaEditError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        parse_size(value)
        return value

    def options(self) -> MergeOptions:
        """The method's options, refusing ones it does not use; unset ones take MergeOptions' defaults."""
        method = get_merge_method(self.method)
        given = {name: getattr(self, name) for name in ("density", "drop", "normalize", "seed") if getattr(self, name) is not None}
        unused = sorted(set(given) - set(method.uses))
        if unused:
            flags = ", ".join(f"--{name}" for name in unused)
            raise PersonaEditError(f"merge method {self.method} does not use {flags} (it uses: {', '.join(method.uses) or 'no options'})")
        return MergeOptions(**given)


def _validated(data: dict[str, Any], where: str) -> MergeConfig:
    try:
        return MergeConfig(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        place = ".".join(str(p) for p in first["loc"]) or "config"
        raise PersonaEditError(f"{where}: {place}: {first['msg']}") from None


def load_config(path: str | Path, **overrides: Any) -> MergeConfig:
    """Read a YAML merge config; vector paths are relative to the file; non-None overrides win."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputFileError(f"cannot read merge config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputFileError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: a merge config is a mapping (base, method, vectors, ...)")
    for key in ("vectors",):
        if isinstance(data.get(key), list):
            data[key] = [_relative_vector(item, path.parent) for item in data[key]]
    if data.get("out") is not None:
        data["out"] = path.parent / str(data["out"])
    data.update({k: v for k, v in overrides.items() if v is not None and v != []})
    return _validated(data, str(path))


def _relative_vector(item: Any, folder: Path) -> Any:
    if isinstance(item, dict) and "path" in item:
        return {**item, "path": folder / str(item["path"])}
    return item


def parse_vector_option(text: str) -> VectorRef:
    """'DIR=ALPHA' or 'DIR' (weight 1) from the command line; ALPHA may be negative."""
    path, sep, weight = text.rpartition("=")
    if not sep:
        return VectorRef(path=Path(text))
    return VectorRef(path=Path(path), weight=finite_number(weight, what=f"--vector {text!r}: the weight after '=' (DIR=ALPHA)"))


def config_from_options(**options: Any) -> MergeConfig:
    """A config from CLI options (None means not given)."""
    return _validated({k: v for k, v in options.items() if v is not None}, "merge options")
