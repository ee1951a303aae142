"""BI1's corpus of broken GGUF files, after llama.cpp's tests/test-gguf.cpp: each case is
(id, how to write it, fragments its one-line error must contain).

Hand-made cases are bytes from tests.gguf_build; the rest plant a defect in the bundled
98 MB model. Those only need its header to be real: the copy holds the first
`_HEADER_COPY` bytes and the rest of its length is a sparse hole, so writing the whole
corpus costs milliseconds and no disk.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType as V

from tests import gguf_build as gb

_HEADER_COPY = 4 << 20  # the bundled header ends at 1.79 MB


def _raw(kvs: list[bytes], infos: list[bytes], data: bytes, n_tensors: int | None = None) -> bytes:
    """A GGUF from raw KV and tensor-info bytes (for tensor types gb.build does not write)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors, len(kvs))
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


def _good_with(kv: bytes) -> bytes:
    return gb.build([kv], [("t", (4,), 0)])


# (id, bytes, fragments)
HANDMADE: list[tuple[str, bytes, list[str]]] = [
    ("magic", b"GGML" + gb.good()[4:], ["magic", "not a GGUF file"]),
    ("version-7", gb.good()[:4] + struct.pack("<I", 7) + gb.good()[8:], ["version", "7"]),
    ("version-1", gb.good()[:4] + struct.pack("<I", 1) + gb.good()[8:], ["version", "unsupported GGUF version 1"]),
    ("kv-count", gb.build([], [], n_kv=1 << 40), ["metadata_kv_count", "absurd"]),
    ("kv-count-max", gb.build([], [], n_kv=(1 << 64) - 1), ["metadata_kv_count", "absurd"]),
    ("tensor-count", gb.build([], [], n_tensors=1 << 40), ["tensor_count", "absurd"]),
    ("dup-key", gb.build([gb.kv_u32("a", 1), gb.kv_u32("a", 2)], []), ["metadata key 'a'", "duplicate"]),
    ("dup-tensor", gb.build([], [("t", (4,), 0), ("t", (4,), 32)]), ["tensor 't'", "duplicate tensor name"]),
    ("value-type", gb.build([gb.s("k") + struct.pack("<I", 99) + b"\0" * 8], []), ["metadata 'k'", "unknown value type 99"]),
    ("huge-string", gb.build([gb.s("k") + struct.pack("<IQ", V.STRING, 1 << 40)], []), ["metadata 'k'", "exceeds the limit"]),
    ("huge-key", gb.build([struct.pack("<Q", 1 << 62) + b"k"], []), ["metadata key #0", "exceeds the limit"]),
    ("string-past-eof", gb.build([gb.s("k") + struct.pack("<IQ", V.STRING, 1 << 20)], []), ["metadata 'k'", "truncated"]),
    ("huge-string-array", gb.build([gb.s("k") + struct.pack("<IIQ", V.ARRAY, V.STRING, 1 << 20)], []), ["metadata 'k'", "cannot fit"]),
    ("string-array-limit", gb.build([gb.s("k") + struct.pack("<IIQ", V.ARRAY, V.STRING, (1 << 21) + 1)], []), ["metadata 'k'", "exceeds the limit of 2097152"]),
    ("huge-u64-array", gb.build([gb.s("k") + struct.pack("<IIQ", V.ARRAY, V.UINT64, 1 << 60)], []), ["metadata 'k'", "exceeds the limit"]),
    ("array-past-eof", gb.build([gb.s("k") + struct.pack("<IIQ", V.ARRAY, V.UINT32, 1 << 20)], []), ["metadata 'k'", "truncated"]),
    ("array-item-type", gb.build([gb.s("k") + struct.pack("<IIQ", V.ARRAY, 77, 1)], []), ["metadata 'k' (array item type)", "unknown value type 77"]),
    ("nested-array", gb.build([gb.s("k") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1)], []), ["nested arrays"]),
    ("bool-2", gb.build([gb.s("k") + struct.pack("<IB", V.BOOL, 2)], []), ["metadata 'k'", "bool value"]),
    ("alignment-24", gb.build([gb.kv_u32("general.alignment", 24)], [], alignment=24), ["general.alignment", "power of two"]),
    ("alignment-0", gb.build([gb.kv_u32("general.alignment", 0)], []), ["general.alignment", "power of two"]),
    ("alignment-string", _good_with(gb.kv_str("general.alignment", "32")), ["general.alignment", "power of two"]),
    ("misaligned-offset", gb.build([], [("t", (4,), 4)], data=bytes(64)), ["tensor 't' offset", "not a multiple of the alignment"]),
    ("offset-past-end", gb.build([], [("t", (4,), 1 << 20)], data=bytes(64)), ["tensor 't'", "past the end of the file"]),
    ("data-past-eof", gb.build([], [("t", (64,), 0)], data=bytes(100)), ["tensor 't'", "data ends at byte", "past the end"]),
    ("overlap", gb.build([], [("a", (16,), 0), ("b", (8,), 32)]), ["tensor 'b' offset", "overlaps", "expected 64"]),
    ("same-offset", gb.build([], [("a", (8,), 0), ("b", (8,), 0)]), ["tensor 'b' offset", "overlaps"]),
    ("gap", gb.build([], [("a", (8,), 0), ("b", (8,), 64)]), ["tensor 'b' offset", "leaves a gap", "expected 32"]),
    ("zero-dim", gb.build([], [("t", (4, 0), 0)]), ["tensor 't' shape", "zero dimension"]),
    ("n-dims-5", gb.build([], [("t", (4, 4, 4, 4, 4), 0)]), ["tensor 't' n_dims", "outside 1..4"]),
    ("n-dims-0", gb.build([], [("t", (), 0)]), ["tensor 't' n_dims", "0 is outside 1..4"]),
    ("n-dims-huge", _raw([], [gb.s("t") + struct.pack("<I", 0xFFFFFFFF)], b""), ["tensor 't' n_dims", "4294967295 is outside"]),
    ("ne-overflow", gb.build([], [("t", (1 << 32, 1 << 32, 1 << 32), 0)], data=bytes(64)), ["tensor 't' shape", "absurd element count"]),
    ("ne-int64-negative", gb.build([], [("t", (1 << 63,), 0)], data=bytes(64)), ["tensor 't' shape", "absurd element count"]),
    ("ne-product-2^62", gb.build([], [("t", (1 << 31, 1 << 31), 0)], data=bytes(64)), ["tensor 't' shape", "absurd element count"]),
    ("block-size", _raw([], [gb.tensor_info("q", (7,), 0, Q.Q4_0)], bytes(64)), ["tensor 'q'", "not a multiple of the Q4_0 block size 32"]),
    ("tensor-type", _raw([], [gb.tensor_info("t", (4,), 0, 250)], bytes(64)), ["tensor 't' type", "unknown tensor type 250"]),
    ("long-tensor-name", gb.build([], [("x" * 64, (4,), 0)]), ["tensor #0 name", "at most 63"]),
    ("bad-utf8-key", gb.build([gb.s(b"\xff\xfe") + struct.pack("<II", V.UINT32, 1)], []), ["metadata key #0", "not valid UTF-8"]),
    ("header-only-16", gb.good()[:16], ["too short"]),
    ("cut-in-kv", gb.good()[:200], ["truncated"]),
    ("cut-in-infos", gb.good()[: gb.good().index(b"output_norm") + 4], ["truncated"]),
]


def _prefix_copy(bundled: Path, dst: Path, size: int, patch: Callable[[bytearray], None] | None = None) -> Path:
    """`dst`: the first bytes of the bundled model (patched), then a hole up to `size`."""
    with open(bundled, "rb") as fh:
        head = bytearray(fh.read(min(size, _HEADER_COPY)))
    if patch:
        patch(head)
    with open(dst, "wb") as out:
        out.write(head)
        out.truncate(size)
    return dst


def bundled_cases(bundled: Path) -> list[tuple[str, Callable[[Path], Path], list[str]]]:
    """Defects planted in the bundled model: truncation at 10/50/99% (and inside the
    header), absurd counts, a tensor offset past the end."""
    size = bundled.stat().st_size
    cases: list[tuple[str, Callable[[Path], Path], list[str]]] = []
    for pct in (10, 50, 99):
        cut = size * pct // 100
        cases.append((f"truncated-{pct}%", lambda d, cut=cut: _prefix_copy(bundled, d, cut), ["past the end of the file"]))
    for cut in (0, 3, 10, 23, 1_000, 600_000, 1_700_000):
        cases.append((f"truncated-at-{cut}", lambda d, cut=cut: _prefix_copy(bundled, d, cut), []))
    cases.append(("truncated-by-1", lambda d: _prefix_copy(bundled, d, size - 1), ["past the end of the file"]))

    def put(at: int, fmt: str, value: int):
        return lambda head: struct.pack_into(fmt, head, at, value)

    cases.append(("bundled-tensor-count", lambda d: _prefix_copy(bundled, d, size, put(8, "<Q", 0xFFFF_FFFF_FFFF)), ["tensor_count", "absurd"]))
    cases.append(("bundled-kv-count", lambda d: _prefix_copy(bundled, d, size, put(16, "<Q", 1 << 33)), ["metadata_kv_count", "absurd"]))
    cases.append(("bundled-version", lambda d: _prefix_copy(bundled, d, size, put(4, "<I", 4)), ["version", "unsupported"]))

    def vocab_count(head: bytearray) -> None:
        key = gb.s("tokenizer.ggml.tokens")
        at = head.index(key) + len(key) + 8  # after the value type and the item type
        struct.pack_into("<Q", head, at, 1 << 24)

    cases.append(("bundled-vocab-count", lambda d: _prefix_copy(bundled, d, size, vocab_count), ["metadata 'tokenizer.ggml.tokens'"]))
    return cases


def truncation_fragments_ok(msg: str) -> bool:
    """Every cut of a file is explained as one: truncated, too short, or past the end."""
    return "truncated" in msg or "too short" in msg or "past the end" in msg
