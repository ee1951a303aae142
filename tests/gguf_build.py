"""Hand-assembled GGUF files, byte by byte, so tests can break any field they like."""
from __future__ import annotations

import struct

from gguf.constants import GGMLQuantizationType, GGUFValueType


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<I", GGUFValueType.UINT32) + struct.pack("<I", value)


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", GGUFValueType.STRING) + s(value)


def kv_str_array(key: str, values: list[str]) -> bytes:
    body = b"".join(s(v) for v in values)
    return s(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, len(values)) + body


def tensor_info(name: str, shape: tuple, offset: int, ttype=GGMLQuantizationType.F32) -> bytes:
    return s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", ttype, offset)


def build(kvs: list[bytes], tensors: list[tuple], version: int = 3, alignment: int = 32, data: bytes | None = None,
          n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """A GGUF: `tensors` is a list of (name, shape, offset) F32 tensors."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensor_info(n, sh, off) for n, sh, off in tensors)
    body += b"\0" * (-len(body) % alignment)
    if data is None:
        end = max((off + 4 * _prod(sh) for _n, sh, off in tensors), default=0)
        data = bytes(end)
    return body + data


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def good() -> bytes:
    """A small valid GGUF: two F32 tensors and a few metadata keys."""
    return build(
        [kv_str("general.architecture", "llama"), kv_u32("llama.context_length", 128), kv_str_array("tokenizer.ggml.tokens", ["a", "b", "c"])],
        [("tok_embd.weight", (8, 3), 0), ("output_norm.weight", (8,), 96)],
    )
