"""BI2: property-based fuzz of the GGUF validator and the safetensors header reader.

Whatever the bytes, `check_gguf` returns a summary or raises GGUFError and
`check_safetensors` returns tensors or raises SafetensorsError: no other exception
escapes, and no example takes more than 1 s (the hypothesis deadline). A safetensors
file we accept is also one the safetensors library opens (we are never looser).

Fast tier: 200 examples per property, derandomized (the same examples on every run).
Slow tier (`pytest -m slow`): 5,000 per property from a fixed seed.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from safetensors import safe_open

from models.gguf_check import GGUFError, check_gguf
from models.safetensors_check import DTYPE_BITS, SafetensorsError, check_safetensors
from tests import gguf_build as gb

FAST = settings(max_examples=200, derandomize=True, deadline=1000, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=5000, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])

# Values that break naive length and count arithmetic.
EDGES = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 64, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
         (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _seed_ggufs() -> list[bytes]:
    """Valid files to mutate: the small one, one with every value type, one with three tensors."""
    every_type = gb.build(
        [gb.kv_str("general.architecture", "llama"), gb.kv_u32("general.alignment", 64),
         gb.s("u8") + struct.pack("<IB", 0, 7), gb.s("i16") + struct.pack("<Ih", 3, -2),
         gb.s("f32") + struct.pack("<If", 6, 1.5), gb.s("b") + struct.pack("<IB", 7, 1),
         gb.s("u64") + struct.pack("<IQ", 10, 1 << 40), gb.s("f64") + struct.pack("<Id", 12, 2.5),
         gb.s("arr") + struct.pack("<IIQ", 9, 5, 3) + struct.pack("<3i", 1, 2, 3),
         gb.kv_str_array("tokenizer.ggml.tokens", ["<s>", "a", "ü"])],
        [("w", (4, 4), 0)], alignment=64)
    three = gb.build([gb.kv_u32("x.count", 3)], [("a", (8,), 0), ("b", (2, 4), 32), ("c", (3,), 64)])
    return [gb.good(), every_type, three]


SEEDS = _seed_ggufs()


@st.composite
def mutated_gguf(draw) -> bytes:
    """A valid GGUF with a few random edits: byte flips, 4/8-byte fields overwritten with
    edge values, cuts, insertions and deletions."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "u32", "u64", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind in ("u32", "u64"):
            width = 4 if kind == "u32" else 8
            value = draw(st.sampled_from(EDGES)) % (1 << (8 * width))
            data[at : at + width] = value.to_bytes(width, "little")
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


@st.composite
def structured_gguf(draw) -> bytes:
    """A GGUF assembled from random parts: keys, value types, counts and tensor infos."""
    kvs = []
    for i in range(draw(st.integers(0, 5))):
        key = draw(st.sampled_from(["general.alignment", "general.architecture", f"k{i}", "tokenizer.ggml.tokens"]))
        vtype = draw(st.integers(0, 14))
        if vtype == 8:
            payload = gb.s(draw(st.text(max_size=20)))
        elif vtype == 9:
            item = draw(st.integers(0, 13))
            count = draw(st.sampled_from(EDGES[:12]))
            payload = struct.pack("<IQ", item, count) + draw(st.binary(max_size=64))
        else:
            payload = draw(st.binary(max_size=8))
        kvs.append(gb.s(key) + struct.pack("<I", vtype) + payload)
    tensors = []
    for i in range(draw(st.integers(0, 4))):
        shape = tuple(draw(st.lists(st.sampled_from(EDGES[:14]), min_size=0, max_size=5)))
        tensors.append((f"t{i}", shape, draw(st.sampled_from([0, 32, 64, 96, 1 << 20]))))
    try:
        return gb.build(kvs, tensors, data=draw(st.binary(max_size=256)))
    except struct.error:  # a shape gb.build itself cannot pack
        return gb.build(kvs, [], data=b"")


@st.composite
def tensor_gguf(draw) -> bytes:
    """A sound metadata section followed by random tensor infos: names, n_dims, dims,
    types and offsets from edge values, and a data section of random length."""
    kvs = [gb.kv_u32("general.alignment", draw(st.sampled_from([1, 8, 32, 64])))] if draw(st.booleans()) else []
    infos = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(["w", "w", "b", "x" * 63, "x" * 64])) if draw(st.integers(0, 3)) else draw(st.text(max_size=8))
        dims = draw(st.lists(st.sampled_from(EDGES[:16]), min_size=0, max_size=6))
        infos.append(gb.s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", draw(st.integers(0, 45)), draw(st.sampled_from([0, 32, 64, 96, 128] + EDGES))))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + draw(st.binary(max_size=256))


def _gguf_verdict(scratch: Path, data: bytes) -> None:
    p = scratch / "fuzz.gguf"
    p.write_bytes(data)
    try:
        summary = check_gguf(p)
    except GGUFError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)
        event("refused at: " + str(exc)[len(str(p)) + 2 :].split()[0].rstrip(":"))
        return
    event("accepted")
    # Accepted: every tensor lies inside the file.
    assert all(summary.data_offset + off + nb <= len(data) for _s, _t, off, nb in summary.tensors.values())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_seed_files_are_valid(scratch):
    """The mutation seeds start valid, so mutations explore near-valid files."""
    for i, data in enumerate(SEEDS):
        (scratch / f"seed{i}.gguf").write_bytes(data)
        assert check_gguf(scratch / f"seed{i}.gguf").version == 3


@FAST
@given(data=st.one_of(mutated_gguf(), structured_gguf(), tensor_gguf(), st.binary(max_size=300)))
def test_gguf_validator_only_raises_its_own_error(scratch, data):
    _gguf_verdict(scratch, data)


@pytest.mark.slow
@SLOW
@seed(20250101)
@given(data=st.one_of(mutated_gguf(), structured_gguf(), tensor_gguf(), st.binary(max_size=300)))
def test_gguf_validator_only_raises_its_own_error_slow(scratch, data):
    _gguf_verdict(scratch, data)


# -- safetensors -----------------------------------------------------------------

_INTS = st.one_of(st.integers(-4, 40), st.sampled_from(EDGES))
_JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                        max_leaves=12)


@st.composite
def tensor_meta(draw):
    meta = {
        "dtype": draw(st.sampled_from(list(DTYPE_BITS)) | st.text(max_size=6)),
        "shape": draw(st.lists(_INTS, max_size=4) | _JSONISH),
        "data_offsets": draw(st.lists(_INTS, min_size=0, max_size=3) | _JSONISH),
    }
    for key in draw(st.sets(st.sampled_from(list(meta)), max_size=1)):
        del meta[key]
    return meta


@st.composite
def plausible_tensors(draw):
    """Mostly-consistent headers (real dtypes and sizes) with tiled, overlapping or
    gapped offsets: where the interesting bugs are."""
    header, at = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(["F32", "F16", "U8", "I64", "F4"]))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        n = 1
        for d in shape:
            n *= d
        size = n * DTYPE_BITS[dtype] // 8
        begin = max(0, at + draw(st.sampled_from([0, 0, 0, -4, 4])))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
        at = begin + size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5) | _JSONISH, max_size=2))
    return header, at + draw(st.sampled_from([0, 0, 0, 1, -1]))


@st.composite
def safetensors_blob(draw) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        header, data_size = draw(plausible_tensors())
        raw = json.dumps(header).encode()
    elif choice == 1:
        header = draw(st.dictionaries(st.text(max_size=6), tensor_meta() | _JSONISH, max_size=4))
        raw, data_size = json.dumps(header).encode(), draw(st.integers(0, 64))
    elif choice == 2:
        raw, data_size = draw(st.binary(max_size=80)), draw(st.integers(0, 16))
    else:  # a valid header with a few bytes of its JSON changed
        raw = bytearray(json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode())
        for _ in range(draw(st.integers(1, 3))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        raw, data_size = bytes(raw), 8
    length = len(raw) if draw(st.integers(0, 9)) else draw(st.sampled_from(EDGES))
    return struct.pack("<Q", length) + raw + bytes(max(0, data_size))


def _safetensors_verdict(scratch: Path, blob: bytes) -> None:
    p = scratch / "fuzz.safetensors"
    p.write_bytes(blob)
    try:
        tensors = check_safetensors(p)
    except SafetensorsError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)
        event("refused at: " + str(exc)[len(str(p)) + 2 :].split()[0].rstrip(":"))
        return
    event("accepted")
    with safe_open(str(p), framework="numpy") as lib:  # the library agrees the header is sound
        assert set(lib.keys()) == set(tensors)


@FAST
@given(blob=safetensors_blob())
def test_safetensors_reader_only_raises_its_own_error(scratch, blob):
    _safetensors_verdict(scratch, blob)


@pytest.mark.slow
@SLOW
@seed(20250101)
@given(blob=safetensors_blob())
def test_safetensors_reader_only_raises_its_own_error_slow(scratch, blob):
    _safetensors_verdict(scratch, blob)
