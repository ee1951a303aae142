"""safetensors headers: real files pass; overlaps, gaps, bad dtypes and shapes, offsets
past the end and malformed JSON are refused naming the file and the field (BI2, BI5)."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from models.registry import ModelError, Registry
from models.safetensors_check import SafetensorsError, check_safetensors


def st_bytes(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def refused(tmp_path, blob: bytes, *fragments: str) -> str:
    p = tmp_path / "model.safetensors"
    p.write_bytes(blob)
    with pytest.raises(SafetensorsError) as info:
        check_safetensors(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_file_written_by_the_safetensors_library_passes(tmp_path):
    p = tmp_path / "real.safetensors"
    save_file({"embed.weight": np.ones((4, 3), np.float32), "norm": np.zeros(3, np.float16),
               "flag": np.array([True]), "empty": np.zeros((0, 5), np.int64)}, str(p), metadata={"format": "np"})
    tensors = check_safetensors(p)
    assert tensors["embed.weight"].dtype == "F32" and tensors["embed.weight"].shape == (4, 3)
    assert tensors["embed.weight"].end - tensors["embed.weight"].begin == 48
    assert tensors["empty"].n_elements == 0
    assert set(tensors) == {"embed.weight", "norm", "flag", "empty"}


def T(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CASES = [
    ("overlap", {"a": T(offsets=(0, 8)), "b": T(offsets=(4, 12))}, 12, ["tensor 'b' data_offsets", "overlaps tensor 'a'"]),
    ("same-bytes", {"a": T(), "b": T()}, 8, ["data_offsets", "overlaps"]),
    ("gap", {"a": T(offsets=(0, 8)), "b": T(offsets=(16, 24))}, 24, ["tensor 'b' data_offsets", "gap after byte 8"]),
    ("past-end", {"a": T(shape=(1 << 40,), offsets=(0, 1 << 42))}, 8, ["tensor 'a' data_offsets", "past the data section"]),
    ("short-tail", {"a": T()}, 16, ["data:", "cover 8 bytes", "holds 16"]),
    ("size-mismatch", {"a": T(shape=(3,), offsets=(0, 8))}, 8, ["tensor 'a' data_offsets", "needs 12"]),
    ("end-before-begin", {"a": T(offsets=(8, 0))}, 8, ["end 0 is before begin 8"]),
    ("dtype", {"a": T(dtype="F33")}, 8, ["tensor 'a' dtype", "unknown dtype 'F33'"]),
    ("dtype-missing", {"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, ["tensor 'a' dtype", "None"]),
    ("shape-negative", {"a": T(shape=(-2,))}, 8, ["tensor 'a' shape"]),
    ("shape-float", {"a": T(shape=(2.0,))}, 8, ["tensor 'a' shape"]),
    ("shape-bool", {"a": T(shape=(True, True))}, 8, ["tensor 'a' shape"]),
    ("shape-string", {"a": {**T(), "shape": "2"}}, 8, ["tensor 'a' shape"]),
    ("too-many-dims", {"a": T(shape=(1,) * 65, offsets=(0, 4))}, 4, ["tensor 'a' shape", "at most 64"]),
    ("offsets-3", {"a": T(offsets=(0, 4, 8))}, 8, ["tensor 'a' data_offsets", "two non-negative integers"]),
    ("offsets-negative", {"a": T(offsets=(-8, 0))}, 8, ["tensor 'a' data_offsets"]),
    ("not-object", {"a": [1, 2]}, 8, ["tensor 'a'", "expected an object"]),
    ("metadata", {"__metadata__": {"k": 1}, "a": T()}, 8, ["__metadata__", "object of strings"]),
    ("f4-odd-bytes", {"a": T(dtype="F4", shape=(3,), offsets=(0, 2))}, 2, ["needs 1.5"]),
]


@pytest.mark.parametrize("header,data_size,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_headers_are_refused(tmp_path, header, data_size, fragments):
    refused(tmp_path, st_bytes(header, bytes(data_size)), *fragments)


@pytest.mark.parametrize("blob,fragments", [
    (b"", ["header length", "too short"]),
    (b"\x05\x00", ["header length", "too short"]),
    (struct.pack("<Q", 1 << 40) + b"{}", ["header length", "exceeds the limit"]),
    (struct.pack("<Q", 100) + b"{}", ["header length", "truncated"]),
    (st_bytes(b"[1, 2]", b""), ["header", "does not start with '{'"]),
    (st_bytes(b"{\"a\": ", b""), ["header", "not valid JSON"]),
    (st_bytes(b"{\"a\": " + b"[" * 100_000 + b"]" * 100_000 + b"}", b""), ["header", "not valid JSON"]),
    (st_bytes(b"{\"\xff\": 1}", b""), ["header", "not valid UTF-8"]),
    (st_bytes(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', bytes(8)), ["header", "duplicate key 'a'"]),
], ids=["empty", "short-prefix", "huge-length", "length-past-eof", "json-array", "json-cut", "json-deep", "utf8", "dup-key"])
def test_malformed_prefix_and_json_are_refused(tmp_path, blob, fragments):
    refused(tmp_path, blob, *fragments)


def test_registry_refuses_hf_folder_with_overlapping_offsets(tmp_path):
    ckpt = tmp_path / "evil-llama"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    good = tmp_path / "good.safetensors"
    save_file({"w": np.ones(4, np.float32)}, str(good))
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(good.read_bytes())
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(
        st_bytes({"a": T(offsets=(0, 8)), "b": T(offsets=(0, 8))}, bytes(8)))
    with pytest.raises(ModelError, match=r"model-00002-of-00002.safetensors: tensor 'b' data_offsets: .* overlaps"):
        Registry().add(ckpt)
    assert [e.name for e in Registry().entries()] == ["smollm2-135m"]
