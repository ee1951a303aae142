"""GGUF validation: good files pass, every kind of corruption is refused naming the field."""
from __future__ import annotations

import shutil
import struct

import pytest

from models.gguf_check import GGUFError, check_gguf
from tests import gguf_build as gb


def write(tmp_path, data: bytes, name="m.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def refused(path, *fragments):
    with pytest.raises(GGUFError) as info:
        check_gguf(path)
    msg = str(info.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_bundled_model_passes(bundled_path):
    summary = check_gguf(bundled_path)
    assert summary.version == 3
    assert summary.metadata["general.architecture"] == "llama"
    assert summary.metadata["tokenizer.ggml.tokens"].length == 49152
    assert len(summary.tensors) == 272
    assert 130_000_000 < summary.n_params < 140_000_000


def test_small_handmade_file_passes(tmp_path):
    summary = check_gguf(write(tmp_path, gb.good()))
    assert set(summary.tensors) == {"tok_embd.weight", "output_norm.weight"}
    assert summary.metadata["llama.context_length"] == 128


@pytest.mark.parametrize(
    "data,fragments",
    [
        (b"GGML" + gb.good()[4:], ["magic", "not a GGUF file"]),
        (gb.good()[:4] + struct.pack("<I", 7) + gb.good()[8:], ["version", "7"]),
        (gb.build([], [], n_kv=1 << 40), ["metadata_kv_count", "absurd"]),
        (gb.build([], [], n_tensors=1 << 40), ["tensor_count", "absurd"]),
        (gb.build([gb.kv_u32("a", 1), gb.kv_u32("a", 2)], []), ["metadata key 'a'", "duplicate"]),
        (gb.build([], [("t", (4,), 0), ("t", (4,), 32)]), ["tensor 't'", "duplicate tensor name"]),
        (gb.build([gb.s("k") + struct.pack("<I", 99) + b"\0" * 8], []), ["metadata 'k'", "unknown value type 99"]),
        (gb.build([gb.s("k") + struct.pack("<IQ", 8, 1 << 40)], []), ["metadata 'k'", "exceeds the limit"]),
        (gb.build([gb.s("k") + struct.pack("<IIQ", 9, 8, 1 << 25)], []), ["metadata 'k'", "cannot fit"]),
        (gb.build([gb.s("k") + struct.pack("<IIQ", 9, 9, 1)], []), ["nested arrays"]),
        (gb.build([gb.kv_u32("general.alignment", 24)], [], alignment=24), ["general.alignment", "power of two"]),
        (gb.build([], [("t", (4,), 4)], data=bytes(64)), ["tensor 't' offset", "not a multiple of the alignment"]),
        (gb.build([], [("t", (4,), 1 << 20)], data=bytes(64)), ["tensor 't'", "past the end of the file"]),
        (gb.build([], [("t", (4, 0), 0)]), ["tensor 't' shape", "zero dimension"]),
        (gb.build([], [("t", (4, 4, 4, 4, 4), 0)]), ["tensor 't' n_dims", "outside 1..4"]),
        (gb.build([gb.s(b"\xff\xfe") + struct.pack("<II", 4, 1)], []), ["metadata key #0", "not valid UTF-8"]),
    ],
    ids=["magic", "version", "kv-count", "tensor-count", "dup-key", "dup-tensor", "value-type", "huge-string",
         "huge-array", "nested-array", "alignment", "misaligned-offset", "offset-past-end", "zero-dim", "too-many-dims", "bad-utf8"],
)
def test_corrupt_handmade_files_are_refused(tmp_path, data, fragments):
    refused(write(tmp_path, data), *fragments)


def test_unknown_tensor_type_is_refused(tmp_path):
    data = bytearray(gb.build([], [("t", (4,), 0)]))
    # The type field sits right after the name and the one dimension.
    at = data.index(b"t" + struct.pack("<I", 1)) + 1 + 4 + 8
    data[at : at + 4] = struct.pack("<I", 250)
    refused(write(tmp_path, bytes(data)), "tensor 't' type", "unknown tensor type 250")


@pytest.mark.parametrize("cut", [0, 3, 10, 23, 1_000, 600_000, 2_000_000, -1])
def test_truncated_bundled_model_is_refused(tmp_path, bundled_path, cut):
    """Truncations in the header, the vocabulary, the tensor infos and the tensor data."""
    p = tmp_path / "cut.gguf"
    shutil.copyfile(bundled_path, p)
    size = p.stat().st_size
    with open(p, "r+b") as fh:
        fh.truncate(cut if cut >= 0 else size + cut)
    msg = refused(p)
    assert "truncated" in msg or "too short" in msg or "past the end" in msg, msg


def test_flipped_header_fields_of_bundled_model(tmp_path, bundled_path):
    p = tmp_path / "flip.gguf"
    shutil.copyfile(bundled_path, p)
    with open(p, "r+b") as fh:
        fh.seek(8)
        fh.write(struct.pack("<Q", 0xFFFF_FFFF_FFFF))  # tensor_count
    refused(p, "tensor_count")


def test_out_of_range_tensor_offset_in_bundled_model(tmp_path, bundled_path):
    """Rewrite the offset of the last tensor info to point past the end."""
    summary = check_gguf(bundled_path)
    name, (shape, ttype, offset, nbytes) = list(summary.tensors.items())[-1]
    raw = bytearray(bundled_path.read_bytes()[: summary.data_offset])
    info_end = raw.rindex(struct.pack("<IQ", ttype, offset))
    raw[info_end + 4 : info_end + 12] = struct.pack("<Q", offset + (1 << 30))
    p = tmp_path / "offset.gguf"
    with open(p, "wb") as fh:
        fh.write(raw)
        with open(bundled_path, "rb") as src:
            src.seek(summary.data_offset)
            shutil.copyfileobj(src, fh)
    refused(p, f"tensor {name!r}", "past the end of the file")


def test_corrupt_file_never_reaches_llama_cpp(tmp_path, bundled_path, monkeypatch):
    from app.engine import Engine
    from models.registry import ModelEntry

    p = write(tmp_path, gb.good()[:50])

    def boom(*a, **k):  # llama.cpp must not even be asked
        raise AssertionError("Llama() was called with a corrupt file")

    monkeypatch.setattr("llama_cpp.Llama", boom)
    with pytest.raises(GGUFError):
        Engine.load(ModelEntry("bad", str(p), "gguf"))


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFError, match="cannot read"):
        check_gguf(tmp_path / "missing.gguf")
