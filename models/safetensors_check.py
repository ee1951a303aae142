"""Validation of a safetensors header before any library maps the tensors behind it.

Layout (https://github.com/huggingface/safetensors, "Format"):
    u64 little-endian N | N bytes of UTF-8 JSON (may be padded with spaces) | data
    JSON: {"__metadata__": {str: str}, NAME: {"dtype": "F32", "shape": [2, 3],
           "data_offsets": [BEGIN, END]}, ...}; offsets are relative to the data.

The rules are the safetensors library's own: a header of at most 100 MB that is a
JSON object, known dtypes, shapes of non-negative integers, END - BEGIN equal to the
elements times the dtype's size, and the tensors tiling the data exactly (sorted by
BEGIN, each starting where the one before ends, the last ending at the end of the
file): an overlap, gap or offset past the end is refused. Errors name the file and
the field::

    >>> check_safetensors("model.safetensors")                  # doctest: +SKIP
    SafetensorsError: model.safetensors: tensor 'lm_head.weight' data_offsets: [0, 24]
    overlaps tensor 'embed.weight' (which ends at 48)
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER = 100_000_000  # the safetensors library's own limit
# Bits per element of each dtype the format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_MAX_DIMS = 64  # far beyond any real tensor; bounds the work on a hostile shape


class SafetensorsError(ValueError):
    """A safetensors file failed validation; the message names the file and the field."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _no_duplicates(pairs: list) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise SafetensorsError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _int_list(value, length: int | None) -> list[int] | None:
    """`value` if it is a list of non-negative ints (of `length`, when given), else None."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return value


def _tensor(fail, name: str, meta) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(meta, dict):
        raise fail(where, f"expected an object, found {type(meta).__name__}")
    dtype = meta.get("dtype")
    if dtype not in DTYPE_BITS:
        raise fail(f"{where} dtype", f"unknown dtype {dtype!r}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or _int_list(shape, None) is None:
        raise fail(f"{where} shape", f"expected a list of at most {_MAX_DIMS} non-negative integers, found {_short(shape)}")
    offsets = _int_list(meta.get("data_offsets"), 2)
    if offsets is None:
        raise fail(f"{where} data_offsets", f"expected [begin, end], two non-negative integers, found {_short(meta.get('data_offsets'))}")
    begin, end = offsets
    if end < begin:
        raise fail(f"{where} data_offsets", f"end {end} is before begin {begin}")
    info = TensorInfo(dtype, tuple(shape), begin, end)
    bits = info.n_elements * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise fail(f"{where} data_offsets", f"{end - begin} bytes, but shape {list(shape)} of {dtype} needs {bits / 8:g}")
    return info


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_header(raw: bytes, data_size: int, path: str | os.PathLike = "<bytes>") -> dict[str, TensorInfo]:
    """Validate header JSON `raw` against a data section of `data_size` bytes."""
    def fail(where: str, problem: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: {where}: {problem}")

    if not raw.startswith(b"{"):
        raise fail("header", "does not start with '{': not a safetensors file")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except SafetensorsError as exc:
        raise fail("header", str(exc)) from None
    except UnicodeDecodeError as exc:
        raise fail("header", f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise fail("header", f"not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise fail("header", f"expected a JSON object, found {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise fail("__metadata__", "expected an object of strings")
    tensors = {name: _tensor(fail, name, m) for name, m in header.items()}
    # The tensors must tile the data section: no overlap, no gap, nothing past the end.
    at, before = 0, None
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        where = f"tensor {name!r} data_offsets"
        if t.end > data_size:
            raise fail(where, f"[{t.begin}, {t.end}] ends past the data section ({data_size} bytes; truncated?)")
        if t.begin < at:
            raise fail(where, f"[{t.begin}, {t.end}] overlaps tensor {before!r} (which ends at {at})")
        if t.begin > at:
            raise fail(where, f"[{t.begin}, {t.end}] leaves a gap after byte {at}")
        at, before = t.end, name
    if at != data_size:
        raise fail("data", f"the tensors cover {at} bytes but the data section holds {data_size}")
    return tensors


def check_safetensors(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Validate the safetensors file at `path` (header only; no tensor is read)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{p}: header length: file is {size} bytes, too short for safetensors (truncated?)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER:
                raise SafetensorsError(f"{p}: header length: {n} bytes exceeds the limit of {MAX_HEADER}")
            if n > size - 8:
                raise SafetensorsError(f"{p}: header length: {n} bytes but the file has {size - 8} after it (truncated?)")
            raw = fh.read(n)
    except OSError as exc:
        raise SafetensorsError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_header(raw, size - 8 - n, p)
