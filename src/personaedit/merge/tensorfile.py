"""Read and write safetensors files one tensor at a time, with plain file reads and writes.

The safetensors library maps a whole file into memory (every page read stays resident) and writes a file
from a dict of tensors held in memory at once; a streaming merge needs neither. The format is small and
fixed: an 8-byte little-endian header length, a JSON header (dtype, shape, byte range per tensor, plus
`__metadata__`), then the raw little-endian bytes. Files written here are read back by `safetensors` in
the tests.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from personaedit.errors import InputFileError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
COPY_BLOCK = 1 << 22  # 4 MiB: untouched tensors are copied through one buffer of this size


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsReader:
    """The header of a safetensors file, and its tensors read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise InputFileError(f"{self.path} is not a readable safetensors file ({exc})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        start = 8 + length
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise InputFileError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            self.tensors[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), start + begin, start + end)
        self._handle: BinaryIO | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _file(self) -> BinaryIO:
        if self._handle is None:
            self._handle = open(self.path, "rb")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, in its stored dtype, in fresh memory (or in the first bytes of the uint8 buffer `into`)."""
        info = self.tensors[name]
        if info.shape:
            return self.read_rows(name, 0, info.shape[0], into)
        return self._read_bytes(info, info.begin, info.nbytes, into).reshape(())

    def read_rows(self, name: str, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start:stop (along the first dimension) of one tensor: contiguous bytes in the file. Read into
        fresh memory, or into the first bytes of the uint8 buffer `into` (a view of it is returned)."""
        info = self.tensors[name]
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        block = self._read_bytes(info, info.begin + start * row_bytes, (stop - start) * row_bytes, into)
        return block.reshape(stop - start, *info.shape[1:])

    def _read_bytes(self, info: TensorInfo, offset: int, size: int, into: torch.Tensor | None = None) -> torch.Tensor:
        if into is None:
            buffer = torch.empty(size, dtype=torch.uint8)
        elif into.dtype != torch.uint8 or into.dim() != 1 or into.numel() < size:
            raise ValueError(f"a read buffer must be a 1-d uint8 tensor of at least {size} bytes")
        else:
            buffer = into[:size]
        handle = self._file()
        handle.seek(offset)
        if size and handle.readinto(memoryview(buffer.numpy())) != size:
            raise InputFileError(f"{self.path} is truncated (tensor {info.name})")
        return buffer.view(DTYPES[info.dtype])

    def copy_raw(self, name: str, out: BinaryIO, buffer: bytearray | None = None) -> None:
        """Copy one tensor's bytes unchanged, in bounded blocks (on its own handle: safe beside `read`
        on another thread), through `buffer` if given (its size is the block), else 16 MiB reads."""
        info = self.tensors[name]
        view = memoryview(buffer if buffer is not None else bytearray(min(info.nbytes, COPY_BLOCK)))
        if not len(view) and info.nbytes:
            raise ValueError("a copy buffer must not be empty")
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(info.begin)
            left = info.nbytes
            while left:
                got = handle.readinto(view[:min(left, len(view))])
                if not got:
                    raise InputFileError(f"{self.path} is truncated (tensor {name})")
                out.write(view[:got])
                left -= got


class SafetensorsWriter:
    """Write a file whose tensor names, dtypes and shapes are known up front, one tensor at a time, in order."""

    def __init__(self, handle: BinaryIO, layout: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, copy_buffer: bytearray | None = None) -> None:
        """`copy_buffer`: what `write_raw` copies through (the merge passes one buffer for all its shards)."""
        self._copy_buffer = copy_buffer
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._sizes: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in layout:
            size = _numel(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes.append((name, size))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer does
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        self._handle = handle
        self._next = 0
        self._partial = 0  # bytes of tensor `_next` written so far

    def _advance(self, name: str, size: int) -> None:
        if self._next >= len(self._sizes):
            raise RuntimeError(f"tensor {name} is not in this file's layout")
        want, want_size = self._sizes[self._next]
        if name != want or self._partial + size > want_size:
            raise RuntimeError(f"expected (the rest of) tensor {want} ({want_size - self._partial} bytes), got {name} ({size} bytes)")
        self._partial += size
        if self._partial == want_size:
            self._next, self._partial = self._next + 1, 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """A whole tensor, or the next consecutive block of its rows."""
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._advance(name, data.numel())
        self._handle.write(memoryview(data.numpy()))

    def write_raw(self, name: str, reader: SafetensorsReader) -> None:
        self._advance(name, reader.tensors[name].nbytes)
        reader.copy_raw(name, self._handle, self._copy_buffer)

    def finish(self) -> None:
        if self._next != len(self._sizes) or self._partial:
            raise RuntimeError(f"{len(self._sizes) - self._next} tensors were not written")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
