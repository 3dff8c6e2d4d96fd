"""Reading and validating one safetensors file, without trusting any of it.

Layout (https://huggingface.co/docs/safetensors): 8 bytes little-endian u64
`N`, then `N` bytes of UTF-8 JSON mapping tensor name -> {dtype, shape,
data_offsets: [begin, end]} (offsets relative to the first byte after the
header) plus an optional `__metadata__` dict of strings, then the data.

Invariants after `read_header` returns:
- the header length fits in the file and the header is a JSON object with no
  duplicate keys;
- every dtype is in `DTYPES`; every shape is a list of non-negative ints;
- every tensor's absolute span `[start, end)` lies inside the file, spans do
  not overlap, and `end - start == prod(shape) * itemsize`.
Any violation raises `UserError` naming the file and, where there is one, the
tensor. Data is read with plain positioned file reads (no mmap), so a file
that shrinks later is caught as a short read instead of a SIGBUS.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

# safetensors dtype strings -> torch dtypes. Only dtypes torch can hold are
# listed: a tensor we could not turn into a torch tensor is bad input for us.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# The reference implementation refuses headers over 100 MB; so do we, before
# allocating anything a corrupt length field asks for.
MAX_HEADER_BYTES = 100 * 1000 * 1000
_PREFIX_BYTES = 8  # the u64 header length

if sys.byteorder != "little":  # safetensors data is little-endian; we view bytes in place
    raise ImportError("lomo_runtime.checkpoint needs a little-endian host")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header record; `start`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of data on disk (`end - start`)."""
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype for `dtype`."""
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        """Number of elements, from the shape."""
        return math.prod(self.shape)


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype string."""
    return DTYPES[dtype].itemsize


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; a header that names
    # a tensor twice is ambiguous, so refuse it.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _read_header_json(path: Path, file_size: int) -> tuple[dict[str, Any], int]:
    """Return the parsed header object and the absolute offset where data begins."""
    if file_size < _PREFIX_BYTES:
        raise UserError(
            f"{path}: truncated: {file_size} bytes, too short for the 8-byte header length; not a safetensors file"
        )
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(_PREFIX_BYTES))
            if header_len > file_size - _PREFIX_BYTES:
                raise UserError(
                    f"{path}: header claims {header_len} bytes but the file holds only "
                    f"{file_size - _PREFIX_BYTES} after the length field (file truncated or not safetensors); "
                    "no tensor can be read"
                )
            if header_len > MAX_HEADER_BYTES:
                raise UserError(f"{path}: header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(header_len)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if len(raw) != header_len:
        raise UserError(f"{path}: short read of the header ({len(raw)} of {header_len} bytes); file changed?")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as dup:
        raise UserError(f"{path}: tensor '{dup.key}': named twice in the header") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: header is not well-formed JSON ({err}); no tensor can be read") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: header is JSON but not an object; no tensor can be read")
    return header, _PREFIX_BYTES + header_len


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: Path, name: str, record: Any, data_start: int, data_len: int) -> TensorEntry:
    where = f"{path}: tensor '{name}'"
    if not name:
        raise UserError(f"{path}: header has a tensor with an empty name")
    if not isinstance(record, dict):
        raise UserError(f"{where}: header record is not an object")
    missing = {"dtype", "shape", "data_offsets"} - record.keys()
    if missing:
        raise UserError(f"{where}: header record lacks {', '.join(sorted(missing))}")
    dtype, shape, offsets = record["dtype"], record["shape"], record["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise UserError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
        raise UserError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise UserError(f"{where}: data_offsets [{begin}, {end}] run backwards")
    if end > data_len:
        raise UserError(
            f"{where}: data_offsets end at byte {end} of the data section but the file holds only {data_len} "
            "(file truncated?)"
        )
    expected = math.prod(shape) * dtype_itemsize(dtype)
    if end - begin != expected:
        raise UserError(
            f"{where}: shape {tuple(shape)} x {dtype} needs {expected} bytes but data_offsets span {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """Read and fully validate the header of the safetensors file at `path`.

    Returns the tensors by name (file order of the header, `__metadata__`
    excluded). Raises `UserError` naming the file and tensor on any defect.
    """
    entries, _ = read_header_with_metadata(path)
    return entries


def read_header_with_metadata(path: str | os.PathLike[str]) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Like `read_header`, also returning the `__metadata__` strings (empty if absent)."""
    path = Path(path)
    file_size = _file_size(path)
    header, data_start = _read_header_json(path, file_size)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: __metadata__ must map strings to strings")
    data_len = file_size - data_start
    entries = {name: _parse_entry(path, name, rec, data_start, data_len) for name, rec in header.items()}
    # Overlap check: sort by start; each span must begin at or after the end of
    # the previous one. Zero-byte tensors overlap nothing.
    ordered = sorted((e for e in entries.values() if e.nbytes), key=lambda e: e.start)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.start < prev.end:
            raise UserError(
                f"{path}: tensor '{cur.name}': data [{cur.start}, {cur.end}) overlaps tensor "
                f"'{prev.name}' [{prev.start}, {prev.end})"
            )
    return entries, dict(metadata)


def read_tensor_data(path: str | os.PathLike[str], entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's bytes with plain file reads and view them as its dtype and shape.

    The returned tensor owns fresh CPU memory. A short read (the file shrank
    after validation) raises `UserError` naming the file and tensor.
    """
    path = Path(path)
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()) if entry.nbytes else memoryview(b"")
    done = 0
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(entry.start)
            while done < entry.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    break
                done += n
    except OSError as err:
        raise UserError(f"{path}: tensor '{entry.name}': read failed ({err.strerror})") from None
    if done != entry.nbytes:
        raise UserError(
            f"{path}: tensor '{entry.name}': short read, {done} of {entry.nbytes} bytes (file changed since it was opened?)"
        )
    return buf.view(entry.torch_dtype).reshape(entry.shape)
