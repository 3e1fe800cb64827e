"""safetensors files in one pass each way: written straight from the tensors' memory (hashed while
written), read back as views into one private mapping of the file (hashed while checked).

The layout is safetensors' own: an 8-byte little-endian header size, a JSON header (padded with
spaces to a multiple of 8) naming each tensor's dtype, shape and byte range, then the bytes,
largest element size first so that every tensor is aligned. safetensors reads these files and
these functions read safetensors' files. Little-endian machines only (every torch platform).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsify.errors import CheckpointError
from sparsify.io.files import HASH_PIECE, atomic_write

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    **{getattr(torch, name): code for name, code in [
        ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
        ("uint64", "U64")] if hasattr(torch, name)},
}
BY_CODE = {code: dtype for dtype, code in DTYPES.items()}
MAX_HEADER = 100_000_000  # safetensors' own limit


# ---------------------------------------------------------------- writing


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list:
    """The file as a list of buffers: the header, then each tensor's bytes (no copy of the data).

    Tensors must be contiguous CPU tensors that share no memory (see checkpoint._cpu_tensors).
    """
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in DTYPES})
    if unknown:
        raise CheckpointError(f"cannot store tensors of dtype {', '.join(unknown)} in a safetensors file; "
                              f"convert them to one of {', '.join(sorted(str(d) for d in DTYPES))}")
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, chunks = 0, []
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        if size:
            chunks.append(tensor.reshape(-1).view(torch.uint8).numpy())
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *chunks]


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                      sha256: bool = False) -> str | None:
    """Atomically write a safetensors file; with `sha256`, its hash (taken while it is written)."""
    return atomic_write(path, encode(tensors, metadata), sha256=sha256)


# ---------------------------------------------------------------- reading


def damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged or truncated ({why}); restore it or delete it")


def parse_header(buffer, file_size: int, path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data) of a file whose bytes `buffer` slices; CheckpointError if unreadable."""
    if file_size < 8:
        raise CheckpointError(f"{path} has only {file_size} bytes: it is truncated or not a safetensors file; "
                              "restore it or delete it")
    (size,) = struct.unpack("<Q", buffer[:8])
    if size > MAX_HEADER or (file_size > 8 and buffer[8:9] != b"{"):  # e.g. text, a zip (.pth), an image
        raise CheckpointError(f"{path} is not a safetensors file (it starts with {bytes(buffer[:8])!r}, not a "
                              "header size and a JSON header)")
    if size > file_size - 8:
        raise CheckpointError(f"{path} is truncated (its header says {size} bytes); restore it or delete it")
    try:
        header = json.loads(buffer[8:8 + size])
    except ValueError:
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    return header, 8 + size


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def layout(header: dict, data_size: int, path: Path) -> list[Entry]:
    """The tensors of a header in file order, checked to tile the data exactly."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = BY_CODE[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in (*shape, start, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise damaged(path, f"tensor {name!r} has an unreadable dtype, shape or offsets") from None
        if end - start != math.prod(shape) * dtype.itemsize:
            raise damaged(path, f"tensor {name!r} has {end - start} bytes for shape {list(shape)}")
        entries.append(Entry(name, dtype, shape, start, end))
    entries.sort(key=lambda e: (e.start, e.end))
    position = 0
    for entry in entries:
        if entry.start != position:
            raise damaged(path, f"tensor {entry.name!r} starts at byte {entry.start}, not {position}")
        position = entry.end
    if position != data_size:
        raise damaged(path, f"the tensors need {position} bytes of data and the file holds {data_size}")
    return entries


class MappedFile:
    """A file mapped once (private, copy-on-write), hashed in a second thread from the moment it is opened."""

    def __init__(self, path: Path, *, sha256: bool = False) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                self.buffer = (mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                               if self.size else b"")
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path} ({exc.strerror}); check that file") from None
        self.digest = hashlib.sha256() if sha256 else None
        self.hasher = threading.Thread(target=self._hash, daemon=True) if sha256 else None
        if self.hasher:
            self.hasher.start()

    def _hash(self) -> None:
        view = memoryview(self.buffer)
        for start in range(0, self.size, HASH_PIECE):
            self.digest.update(view[start:start + HASH_PIECE])

    def sha256(self) -> str:
        self.hasher.join()
        return self.digest.hexdigest()

    def header(self) -> tuple[dict, int]:
        """The JSON header and the offset where the data starts."""
        return parse_header(self.buffer, self.size, self.path)

    def tensors(self, header: dict, data_start: int) -> dict[str, torch.Tensor]:
        """The tensors in file order, as views into the mapping (a copy only where one is misaligned)."""
        entries = layout(header, self.size - data_start, self.path)
        base = torch.frombuffer(self.buffer, dtype=torch.uint8) if self.size else torch.empty(0, dtype=torch.uint8)
        out = {}
        for e in entries:
            raw = base[data_start + e.start:data_start + e.end]
            if e.start == e.end:
                out[e.name] = torch.empty(e.shape, dtype=e.dtype)
                continue
            if (data_start + e.start) % e.dtype.itemsize:
                raw = raw.clone()
            out[e.name] = raw.view(e.dtype).reshape(e.shape)
        return out


def read_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and where its data starts (reads only the header's pages)."""
    return MappedFile(path).header()
