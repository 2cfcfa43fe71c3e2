"""The streaming merge: base tensors and vector tensors are read one at a time (large ones in blocks of
rows), merged, and written shard by shard into a standard Hugging Face folder by a writer thread that
runs behind the merging, so peak memory is a few blocks, whatever the model.

A personality vector is a WeightEdit folder (`edit.json` + `tensors.safetensors`, tensors named
`{param}.delta` or `{param}.u` / `{param}.v` with ΔW = u vᵀ). The target model may differ from the
vector's base (transfer) as long as every touched parameter has the same shape. Tensors no vector
touches (tied embeddings included) are copied byte for byte.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from personaedit.edits.base import EDIT_JSON, TENSORS_FILE, BaseModelInfo, read_edit_metadata
from personaedit.errors import EditError, InputFileError, ModelNotFoundError, PersonaEditError
from personaedit.faults import fault_point
from personaedit.fileio import atomic_dir
from personaedit.merge.config import MergeConfig, parse_size
from personaedit.merge.methods import Buffers, MergeMethod, combine, get_merge_method, sparsifier
from personaedit.merge.tensorfile import COPY_BLOCK, DTYPES, FLOAT_CODES, SafetensorsReader, SafetensorsWriter
from personaedit.progress import Progress

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
RECORD_FILE = "personaedit-merge.json"
BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32: larger tensors are merged block by block
# Files of a model folder that are weights or our own bookkeeping, not copied beside the merged weights.
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_NOT_COPIED_NAMES = (INDEX_FILE, "personaedit-cache.json", RECORD_FILE)


# --- the base model on disk ------------------------------------------------------------------------

def model_folder(spec: str) -> Path:
    """The safetensors folder of a MODEL spec. `default` and `.gguf` files go through the same
    conversion cache as `load_model`; a hub id must already be in the local Hugging Face cache."""
    from personaedit.models.loading import resolve_source

    source = resolve_source(spec)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise ModelNotFoundError(
            f"{spec!r} is not a local folder and not in the local Hugging Face cache ({type(exc).__name__})"
        ) from None


class Checkpoint:
    """The tensors of a model folder (one safetensors file or an index of shards), read lazily."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise InputFileError(f"{index} is not a safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ModelNotFoundError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints can be merged")
        self.readers = [SafetensorsReader(folder / name) for name in files]
        self.where: dict[str, SafetensorsReader] = {}
        for reader in self.readers:
            for name in reader.tensors:
                self.where[name] = reader

    def keys_in_file_order(self) -> list[str]:
        """Every tensor, file by file, by position in its file (reads stay sequential)."""
        return [name for reader in self.readers for name in sorted(reader.tensors, key=lambda n: reader.tensors[n].begin)]

    def info(self, key: str):
        return self.where[key].tensors[key]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


# --- personality vectors on disk -------------------------------------------------------------------

@dataclass
class VectorFile:
    """A weight-edit folder whose deltas are read one parameter at a time."""

    path: Path
    method: str
    scale: float
    persona: Optional[dict]
    base: Optional[BaseModelInfo]
    shapes: dict[str, tuple[int, ...]]
    ranks: dict[str, Optional[int]]
    reader: Optional[SafetensorsReader] = field(repr=False, default=None)

    @classmethod
    def open(cls, path: str | Path) -> "VectorFile":
        path = Path(path)
        if not (path / EDIT_JSON).is_file():
            raise EditError(f"{path} is not a personality vector (no {EDIT_JSON})")
        meta = read_edit_metadata(path)
        if meta.get("kind") != "weight":
            kind = meta.get("kind")
            article = "an" if str(kind)[:1] in "aeiou" else "a"
            raise EditError(f"{path} is {article} {kind} edit, not a personality vector: `vector` and `merge` take weight "
                            f"edits (from `vector train`, `vector from-finetune`, rome, palette, memit, mend)")
        try:
            deltas = meta["payload"]["deltas"]
            shapes = {name: tuple(info["shape"]) for name, info in deltas.items()}
            ranks = {name: info.get("rank") for name, info in deltas.items()}
            base = BaseModelInfo(**meta["base_model"]) if meta.get("base_model") else None
        except (KeyError, TypeError) as exc:
            raise EditError(f"{path}: malformed weight edit ({exc})") from None
        reader = SafetensorsReader(path / TENSORS_FILE) if deltas else None
        vector = cls(path, meta.get("method", "?"), float(meta.get("scale", 1.0)), meta.get("persona"), base, shapes, ranks, reader)
        vector._check_tensors()
        return vector

    def _check_tensors(self) -> None:
        for name, shape in self.shapes.items():
            for key in self._keys(name):
                if self.reader is None or key not in self.reader:
                    raise EditError(f"{self.path}: {TENSORS_FILE} lacks tensor {key}")
            if self.ranks[name] is None and self.reader.tensors[f"{name}.delta"].shape != shape:
                raise EditError(f"{self.path}: {name}.delta has shape {self.reader.tensors[f'{name}.delta'].shape}, edit.json says {shape}")

    def _keys(self, name: str) -> list[str]:
        return [f"{name}.delta"] if self.ranks[name] is None else [f"{name}.u", f"{name}.v"]

    def delta(self, name: str, dtype: torch.dtype = torch.float32, rows: Optional[tuple[int, int]] = None,
              out: Optional[torch.Tensor] = None, raw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense ΔW of one parameter (u vᵀ for factors), or of its rows start:stop, times the edit's own scale:
        in fresh memory, or written into `out` (the result's shape and dtype). A stored dense ΔW of another dtype
        is read through the uint8 buffer `raw` when one is given."""
        first = f"{name}.delta" if self.ranks[name] is None else f"{name}.u"
        whole = rows is None or not self.shapes[name]

        def read(into: Optional[torch.Tensor]) -> torch.Tensor:
            return self.reader.read(first, into) if whole else self.reader.read_rows(first, *rows, into)

        if self.ranks[name] is not None:
            v = self.reader.read(f"{name}.v").to(dtype)
            dense = read(None).to(dtype) @ v.T if out is None else torch.matmul(read(None).to(dtype), v.T, out=out)
        elif out is None:
            dense = read(None).to(dtype)
        elif DTYPES[self.reader.tensors[first].dtype] == dtype:
            read(out.view(-1).view(torch.uint8))  # the stored bytes are the values: read straight into `out`
            dense = out
        else:
            dense = out.copy_(read(raw).reshape(out.shape))
        return dense if self.scale == 1.0 else (dense * self.scale if out is None else dense.mul_(self.scale))

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def loaded_names(folder: Path, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> the parameter name transformers loads it as. Some families store legacy names
    (GPT-NeoX's `embed_out` is `lm_head`); transformers' own renaming rules for the folder's
    architecture say how. Tensors it converts rather than renames keep their key (and will not match)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without renaming rules loads checkpoint names as they are
        return {key: key for key in keys}
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    rules = None
    for name in [*(config.get("architectures") or []), config.get("model_type")]:
        if name and rules is None:
            rules = get_checkpoint_conversion_mapping(name)
    renames = [rule for rule in rules or [] if isinstance(rule, WeightRenaming)]
    names = {}
    for key in keys:
        name = key
        for rule in renames:
            name, _ = rule.rename_source_key(name)
        names[key] = name
    return names


def match_keys(names: list[str], loaded: dict[str, str]) -> dict[str, str]:
    """Parameter name -> checkpoint key: the key loaded under that name, else the one key that is a dotted
    suffix of the name (or the other way round), as when a checkpoint omits the `transformer.` prefix."""
    by_name = {name: key for key, name in loaded.items()}
    mapping: dict[str, str] = {}
    for name in names:
        if name in by_name:
            mapping[name] = by_name[name]
            continue
        found = [k for k, n in loaded.items() if name.endswith("." + n) or n.endswith("." + name)]
        if len(found) == 1:
            mapping[name] = found[0]
    return mapping


# --- the merge -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeResult:
    out: Path
    method: str
    tensors_total: int
    tensors_merged: int
    shards: int
    bytes_written: int
    seconds: float


def _plan_shards(keys: list[str], checkpoint: Checkpoint, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = checkpoint.info(key).nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _refuse_foreign_output(out: Path, base_folder: Path) -> None:
    if out.resolve() == base_folder.resolve():
        raise PersonaEditError(f"--out {out} is the base model's own folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORD_FILE).is_file())):
        raise PersonaEditError(f"refusing to overwrite {out}: it exists and is not a personaedit merge output")


def merge(config: MergeConfig, out: Optional[Path] = None, *, on_progress: Optional[Progress] = None,
          block_elements: int = BLOCK_ELEMENTS) -> MergeResult:
    """Merge the config's vectors into its base and write a Hugging Face model folder to `out`.
    Tensors larger than `block_elements` are merged and written in blocks of rows (same result)."""
    start = time.perf_counter()
    out = Path(out or config.out or "")
    if not str(out) or out == Path("."):
        raise PersonaEditError("no output folder: pass --out DIR (or `out:` in the config)")
    method = get_merge_method(config.method)
    options = config.options()
    max_bytes = parse_size(config.max_shard_size)
    folder = model_folder(config.base)
    _refuse_foreign_output(out, folder)
    checkpoint = Checkpoint(folder)
    vectors = [VectorFile.open(ref.path) for ref in config.vectors]
    try:
        touched = _match_vectors(vectors, checkpoint)
        keys = checkpoint.keys_in_file_order()
        shards = _plan_shards(keys, checkpoint, max_bytes)
        names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        copied = [checkpoint.info(k).nbytes for k in keys if k not in touched]
        space = _Workspace(list(touched), checkpoint, vectors, method, options, block_elements,
                           min(max(copied, default=0), COPY_BLOCK))
        done = 0
        with atomic_dir(out) as tmp:
            for name, shard in zip(names, shards):
                with open(tmp / name, "wb") as handle, _WriteBehind() as behind:
                    layout = [(k, checkpoint.info(k).dtype, checkpoint.info(k).shape) for k in shard]
                    writer = SafetensorsWriter(handle, layout, {"format": "pt"}, space.copy)
                    for key in shard:
                        if key in touched:
                            for block in _merged_blocks(key, touched[key], checkpoint, vectors, config, method, options,
                                                        block_elements, space):
                                space.writing(behind.submit(writer.write, key, block))
                        else:
                            behind.submit(writer.write_raw, key, checkpoint.where[key])
                        done += 1
                        if on_progress:
                            on_progress(done, len(keys))
                        fault_point("merge.tensor")
                    behind.drain()
                    writer.finish()
            total = sum(checkpoint.info(k).nbytes for k in keys)
            if len(shards) > 1:
                weight_map = {k: n for n, shard in zip(names, shards) for k in shard}
                (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
            _copy_model_files(folder, tmp)
            record = _record(config, options, vectors, touched, len(keys))
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    finally:
        checkpoint.close()
        for vector in vectors:
            vector.close()
    return MergeResult(out, config.method, len(keys), len(touched), len(shards), total, time.perf_counter() - start)


class _WriteBehind:
    """Writes run in order on one background thread, at most `depth` behind, so the disk works while the
    next tensor is merged; memory stays bounded by `depth` tensors."""

    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writer")
        self._pending: deque[Future] = deque()
        self._depth = depth

    def submit(self, fn: Callable[..., None], *args) -> Future:
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        while len(self._pending) > self._depth:
            self._pending.popleft().result()
        return future

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> "_WriteBehind":
        return self

    def __exit__(self, *exc) -> None:
        # On an error, pending writes are dropped; the one running finishes before the file is closed.
        self._pool.shutdown(wait=True, cancel_futures=True)


def _match_vectors(vectors: list[VectorFile], checkpoint: Checkpoint) -> dict[str, list[tuple[int, str]]]:
    """Checkpoint key -> [(vector index, parameter name)]; refuses missing parameters and shape mismatches."""
    loaded = {key: key for key in checkpoint.where}
    if any(name not in loaded for vector in vectors for name in vector.shapes):
        loaded = loaded_names(checkpoint.folder, list(checkpoint.where))  # imports much of transformers: only if needed
    touched: dict[str, list[tuple[int, str]]] = {}
    for index, vector in enumerate(vectors):
        mapping = match_keys(list(vector.shapes), loaded)
        for name, shape in vector.shapes.items():
            if name not in mapping:
                raise EditError(f"vector {vector.path} changes {name}, which the base model {checkpoint.folder} does not have")
            info = checkpoint.info(mapping[name])
            if tuple(info.shape) != tuple(shape):
                raise EditError(
                    f"vector {vector.path} does not fit the base model: {name} has shape {tuple(shape)} in the vector "
                    f"and {tuple(info.shape)} in {checkpoint.folder}"
                )
            if info.dtype not in FLOAT_CODES:
                raise EditError(f"vector {vector.path} changes {name}, stored as {info.dtype}; only float tensors can be merged")
            touched.setdefault(mapping[name], []).append((index, name))
    return touched


def _block_rows(info, block_elements: int) -> tuple[int, int, int]:
    """(rows, entries per row, rows per block) of a tensor merged in blocks of about `block_elements` entries."""
    shape = info.shape or (1,)
    per_row = max(1, math.prod(shape[1:]))
    return shape[0], per_row, max(1, block_elements // per_row)


def _work_dtype(info) -> torch.dtype:
    return torch.float64 if info.dtype == "F64" else torch.float32


class _Workspace:
    """Every buffer a merge computes in, allocated once per merge and sized to its largest block: per vector a
    block of δ, the scratch of the sparsification and sign election (methods.Buffers), |δ| of the largest tensor
    when magnitudes are trimmed, the buffer untouched tensors are copied through, and a ring of output blocks the
    writer thread writes from. Reusing them keeps the heap the same size from the first tensor to the last: with
    a fresh 16 MB block per step, glibc's malloc (whose mmap threshold rises to the size of a freed block) serves
    later blocks from a heap that keeps what it frees, and the peak grew with the number of tensors."""

    RING = 3  # output blocks: the one being merged plus the writer's queue (_WriteBehind's depth, 2)

    def __init__(self, keys: list[str], checkpoint: Checkpoint, vectors: list[VectorFile], method: MergeMethod, options,
                 block_elements: int, copy_bytes: int) -> None:
        elements = out_bytes = work_size = magnitudes = 0
        # a dense δ stored in another dtype than the work dtype is read through `values` before it is converted
        stored = max((DTYPES[v.reader.tensors[f"{name}.delta"].dtype].itemsize for v in vectors
                      for name, rank in v.ranks.items() if rank is None), default=0)
        for key in keys:
            info = checkpoint.info(key)
            rows, per_row, step = _block_rows(info, block_elements)
            block = min(rows, step) * per_row
            elements = max(elements, block)
            out_bytes = max(out_bytes, block * DTYPES[info.dtype].itemsize)
            work_size = max(work_size, _work_dtype(info).itemsize)
            magnitudes = max(magnitudes, rows * per_row)
        work_bytes = work_size * elements
        trims = method.sparsify == "magnitude" and options.density < 1
        disjoint = method.combine == "disjoint"

        def buffer(nbytes: int) -> torch.Tensor:
            return torch.empty(nbytes, dtype=torch.uint8)

        self.deltas = [buffer(work_bytes) for _ in vectors]
        self.values = buffer(max(work_bytes, elements * stored))  # the base rows are read into it too
        self.mask = buffer(elements)
        self.total = buffer(work_bytes)  # the merged block when the base's dtype is not the work dtype (else unused: untouched pages)
        self.elected = buffer(work_bytes) if disjoint else None
        self.divisor = buffer(work_bytes) if disjoint else None
        self.magnitudes = buffer(magnitudes * work_size) if trims else None
        self.copy = bytearray(copy_bytes)
        self.ring = [buffer(out_bytes) for _ in range(self.RING)]
        self._writes: list[Optional[Future]] = [None] * self.RING
        self._next = self._taken = 0

    @staticmethod
    def view(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return buffer[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)

    def scratch(self, shape: tuple[int, ...], work: torch.dtype) -> Buffers:
        return Buffers(self.view(self.values, work, shape), self.view(self.mask, torch.bool, shape),
                       None if self.elected is None else self.view(self.elected, work, shape),
                       None if self.divisor is None else self.view(self.divisor, work, shape))

    def take_output(self) -> torch.Tensor:
        """The next output block of the ring, once the writer has written what it held."""
        index = self._next
        if self._writes[index] is not None:
            self._writes[index].result()
            self._writes[index] = None
        self._taken, self._next = index, (index + 1) % self.RING
        return self.ring[index]

    def writing(self, future: Future) -> None:
        """The write of the block last taken: its buffer is not handed out again before it is done."""
        self._writes[self._taken] = future


def _merged_blocks(key, contributors, checkpoint, vectors, config, method, options, block_elements,
                   space: _Workspace) -> Iterator[torch.Tensor]:
    """base + ΔW for one tensor, as consecutive blocks of rows in the base's dtype, each a view of the next
    output buffer of `space` (valid until the caller hands that buffer's write to `space.writing`)."""
    reader = checkpoint.where[key]
    info = reader.tensors[key]
    work = _work_dtype(info)
    base_dtype = DTYPES[info.dtype]
    rows, per_row, step = _block_rows(info, block_elements)
    present = dict(contributors)
    weights = [ref.weight for ref in config.vectors]
    blocks = [(start, min(rows, start + step)) for start in range(0, rows, step)]

    def shape_of(start: int, stop: int) -> tuple[int, ...]:
        return (stop - start, *info.shape[1:]) if info.shape else (1,)

    def magnitudes(i: int) -> torch.Tensor:
        # Built from the same blocks as the merge, so a magnitude threshold sees exactly the values it trims.
        out = space.view(space.magnitudes, work, (rows * per_row,))
        for start, stop in blocks:
            delta = vectors[i].delta(present[i], work, (start, stop), space.view(space.deltas[i], work, shape_of(start, stop)),
                                     space.values)
            torch.abs(delta.reshape(-1), out=out[start * per_row:stop * per_row])
        return out

    sparsify = [sparsifier(method, options, i, key, lambda i=i: magnitudes(i)) if i in present else None for i in range(len(vectors))]
    for start, stop in blocks:
        shape = shape_of(start, stop)
        scratch = space.scratch(shape, work)
        deltas = []
        for i in range(len(vectors)):
            block = space.view(space.deltas[i], work, shape)
            if i in present:
                block = sparsify[i](vectors[i].delta(present[i], work, (start, stop), block, space.values), scratch)
            else:  # a vector that does not touch this tensor contributes δ = 0 (it still counts in sign election)
                block.zero_()
            deltas.append(block)
        output = space.take_output()
        if base_dtype == work:  # merged straight into the output block; the base rows are read into `values`
            change = combine(method, deltas, weights, options, space.view(output, work, shape), scratch)
            base = reader.read_rows(key, start, stop, space.values) if info.shape else reader.read(key, space.values)
            change.add_(base.reshape(shape))
        else:  # merged in the work dtype, the base rows read into the output block, converted, added, rounded back
            change = combine(method, deltas, weights, options, space.view(space.total, work, shape), scratch)
            base = reader.read_rows(key, start, stop, output) if info.shape else reader.read(key, output)
            change.add_(scratch.values.copy_(base.reshape(shape)))
            change = space.view(output, base_dtype, shape).copy_(change)
        yield change if info.shape else change.reshape(())


def _copy_model_files(source: Path, target: Path) -> None:
    """Config, tokenizer, generation config, chat template: every small non-weight file of the base."""
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in _NOT_COPIED_NAMES and not path.name.endswith(_NOT_COPIED):
            shutil.copyfile(path, target / path.name)


def _record(config: MergeConfig, options, vectors: list[VectorFile], touched: dict, total: int) -> dict:
    from personaedit import __version__

    method = get_merge_method(config.method)
    return {
        "created_by": f"personaedit {__version__}",
        "base": config.base,
        "method": config.method,
        "options": {name: getattr(options, name) for name in method.uses},
        "vectors": [
            {
                "path": str(ref.path),
                "weight": ref.weight,
                "scale": vector.scale,
                "persona": vector.persona,
                "made_for": vector.base.spec if vector.base else None,
                "parameters": len(vector.shapes),
            }
            for ref, vector in zip(config.vectors, vectors)
        ],
        "tensors": total,
        "tensors_merged": len(touched),
    }
