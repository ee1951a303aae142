"""Structural validation of a GGUF file before anything native touches it.

llama.cpp trusts the header it reads: a flipped count or an offset past the end of
the file can make it allocate absurd amounts of memory or read out of bounds. This
module walks the whole header in Python with explicit bounds checks and refuses a
bad file with an error that names the file and the field, e.g.::

    >>> check_gguf("broken.gguf")                        # doctest: +SKIP
    GGUFError: broken.gguf: tensor 'blk.0.attn_q.weight': data ends at byte 9216
    past the end of the file (8192 bytes)

Layout (GGUF v2/v3, little endian; see ggml/docs/gguf.md):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 type, value)
    n_tensors x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data: each tensor
    at the offset where the one before it ends, padded to the alignment (llama.cpp
    refuses gaps, overlaps and any other order).

The type tables (value types, tensor types and their block sizes) come from the
`gguf` package, so new quantization types are known as soon as gguf knows them.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Caps well above any real model (the largest vocabularies are ~260k tokens, the
# largest models a few thousand tensors) and far below what would exhaust memory.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_KEY_LEN = 1 << 16
MAX_STRING_LEN = 1 << 26  # 64 MiB: chat templates are a few KiB
MAX_ARRAY_LEN = 1 << 26
MAX_STRING_ARRAY_LEN = 1 << 21  # 2M strings; vocabularies and merge lists stay under 300k
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME, including the terminating NUL

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class GGUFError(ValueError):
    """A GGUF file failed validation; the message names the file and the field."""


@dataclass
class GGUFSummary:
    """What the validating walk learned: scalar metadata and array lengths.

    `metadata` holds scalars and strings as Python values; for arrays it holds
    only their length (``{"tokenizer.ggml.tokens": ArrayLen(49152)}``) so a
    summary stays small whatever the vocabulary size.
    """

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)  # name -> (shape, GGMLQuantizationType, offset, nbytes)

    @property
    def n_params(self) -> int:
        total = 0
        for shape, _type, _off, _nb in self.tensors.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


@dataclass(frozen=True)
class ArrayLen:
    """Stands in for an array value in GGUFSummary.metadata: its item type and length."""

    item_type: GGUFValueType
    length: int


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer."""

    def __init__(self, buf, path: Path):
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, where: str, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {where}: {problem}")

    def need(self, n: int, where: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(where, f"needs {n} bytes at offset {self.pos} but the file ends at {self.size} (truncated?)")

    def unpack(self, fmt: str, where: str):
        n = struct.calcsize(fmt)
        self.need(n, where)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self, where: str) -> int:
        return self.unpack("<I", where)

    def u64(self, where: str) -> int:
        return self.unpack("<Q", where)

    def string(self, where: str, max_len: int = MAX_STRING_LEN) -> str:
        n = self.u64(f"{where} (length)")
        if n > max_len:
            raise self.fail(where, f"string length {n} exceeds the limit of {max_len} bytes")
        self.need(n, where)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(where, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def skip_string(self, where: str) -> None:
        n = self.u64(f"{where} (length)")
        if n > MAX_STRING_LEN:
            raise self.fail(where, f"string length {n} exceeds the limit of {MAX_STRING_LEN} bytes")
        self.need(n, where)
        self.pos += n


def _skip_strings(cur: _Cursor, count: int, where: str) -> None:
    """Skip `count` length-prefixed strings: the vocabulary's hot loop (~100k items),
    so the error text for an item is only built once an item is bad."""
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, struct.unpack_from
    for i in range(count):
        if pos + 8 > size:
            break
        n = unpack("<Q", buf, pos)[0]
        if n > MAX_STRING_LEN or pos + 8 + n > size:
            break
        pos += 8 + n
    else:
        cur.pos = pos
        return
    cur.pos = pos
    cur.skip_string(f"{where}[{i}]")  # raises, naming the item
    raise AssertionError("unreachable")  # pragma: no cover


def _value_type(cur: _Cursor, raw: int, where: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cur.fail(where, f"unknown value type {raw}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, where: str):
    if vtype == GGUFValueType.STRING:
        return cur.string(where)
    if vtype == GGUFValueType.ARRAY:
        item_type = _value_type(cur, cur.u32(f"{where} (array item type)"), f"{where} (array item type)")
        if item_type == GGUFValueType.ARRAY:
            raise cur.fail(where, "nested arrays are not supported")
        count = cur.u64(f"{where} (array length)")
        if count > MAX_ARRAY_LEN:
            raise cur.fail(where, f"array length {count} exceeds the limit of {MAX_ARRAY_LEN}")
        if item_type == GGUFValueType.STRING:
            # Each string needs at least its 8-byte length: refuse before looping
            # over a count the file cannot possibly hold.
            if count > MAX_STRING_ARRAY_LEN:
                raise cur.fail(where, f"array of {count} strings exceeds the limit of {MAX_STRING_ARRAY_LEN}")
            if count * 8 > cur.size - cur.pos:
                raise cur.fail(where, f"array of {count} strings cannot fit in the rest of the file")
            _skip_strings(cur, count, where)
        else:
            nbytes = count * struct.calcsize(_SCALAR_FORMATS[item_type])
            cur.need(nbytes, where)
            cur.pos += nbytes
        return ArrayLen(item_type, count)
    if vtype == GGUFValueType.BOOL:  # read as a byte: struct's "?" maps any non-zero byte to True
        raw = cur.unpack("<B", where)
        if raw > 1:
            raise cur.fail(where, f"bool value {raw} is neither 0 nor 1")
        return bool(raw)
    return cur.unpack(_SCALAR_FORMATS[vtype], where)


def _tensor_nbytes(cur: _Cursor, name: str, shape: tuple, ttype: GGMLQuantizationType) -> int:
    where = f"tensor {name!r}"
    block_size, type_size = GGML_QUANT_SIZES[ttype]
    n = 1
    for d in shape:
        n *= d
    if shape and shape[0] % block_size:
        raise cur.fail(where, f"first dimension {shape[0]} is not a multiple of the {ttype.name} block size {block_size}")
    return n // block_size * type_size


def _walk(buf, path: Path, file_size: int) -> GGUFSummary:
    cur = _Cursor(buf, path)
    cur.need(4, "magic")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise cur.fail("magic", f"expected b'GGUF', found {magic!r}: not a GGUF file")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail("version", f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor_count")
    n_kv = cur.u64("metadata_kv_count")
    # A KV pair takes at least 8 (key length) + 1 + 4 (type) + 1 bytes, a tensor
    # info at least 8 + 1 + 4 + 8 + 4 + 8.
    if n_kv > MAX_KV or n_kv * 14 > file_size:
        raise cur.fail("metadata_kv_count", f"absurd value {n_kv} for a file of {file_size} bytes")
    if n_tensors > MAX_TENSORS or n_tensors * 33 > file_size:
        raise cur.fail("tensor_count", f"absurd value {n_tensors} for a file of {file_size} bytes")

    metadata: dict = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY_LEN)
        if key in metadata:
            raise cur.fail(f"metadata key {key!r}", "duplicate key")
        vtype = _value_type(cur, cur.u32(f"metadata {key!r} (type)"), f"metadata {key!r}")
        metadata[key] = _read_value(cur, vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail("metadata 'general.alignment'", f"must be a power of two, found {alignment!r}")

    infos = []
    names: set = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name", MAX_KEY_LEN)
        where = f"tensor {name!r}"
        if len(name.encode("utf-8")) >= MAX_NAME:
            raise cur.fail(f"tensor #{i} name", f"{len(name.encode('utf-8'))} bytes; llama.cpp allows at most {MAX_NAME - 1}")
        if name in names:
            raise cur.fail(where, "duplicate tensor name")
        names.add(name)
        n_dims = cur.u32(f"{where} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"{where} n_dims", f"{n_dims} is outside 1..{MAX_DIMS}")
        shape = tuple(cur.u64(f"{where} dim {d}") for d in range(n_dims))
        n_elements = 1
        for d in shape:
            if d == 0:
                raise cur.fail(f"{where} shape", f"zero dimension in {list(shape)}")
            n_elements *= d
        if n_elements >= 1 << 62:
            raise cur.fail(f"{where} shape", f"absurd element count for shape {list(shape)}")
        raw_type = cur.u32(f"{where} type")
        try:
            ttype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise cur.fail(f"{where} type", f"unknown tensor type {raw_type}") from None
        if ttype not in GGML_QUANT_SIZES:
            raise cur.fail(f"{where} type", f"tensor type {ttype.name} has no known block size")
        offset = cur.u64(f"{where} offset")
        if offset % alignment:
            raise cur.fail(f"{where} offset", f"{offset} is not a multiple of the alignment {alignment}")
        infos.append((name, shape, ttype, offset))

    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    data_size = file_size - data_offset
    if data_size < 0:
        raise cur.fail("tensor data", f"starts at byte {data_offset} past the end of the file ({file_size} bytes)")
    tensors: dict = {}
    expected = 0  # llama.cpp's rule: tensors are stored in info order, each padded to the alignment
    for name, shape, ttype, offset in infos:
        nbytes = _tensor_nbytes(cur, name, shape, ttype)
        end = data_offset + offset + nbytes
        if end > file_size:
            raise cur.fail(
                f"tensor {name!r}",
                f"data ends at byte {end} past the end of the file ({file_size} bytes; truncated or bad offset)",
            )
        if offset != expected:
            problem = "overlaps the tensor before it" if offset < expected else "leaves a gap after the tensor before it"
            raise cur.fail(f"tensor {name!r} offset", f"{offset} {problem} (expected {expected})")
        expected += (nbytes + alignment - 1) // alignment * alignment
        tensors[name] = (shape, ttype, offset, nbytes)
    return GGUFSummary(path, version, file_size, alignment, data_offset, metadata, tensors)


def check_gguf(path: str | os.PathLike) -> GGUFSummary:
    """Validate the GGUF at `path` and return its summary, or raise GGUFError.

    The file is memory-mapped; only the header pages are touched, so this costs
    a few tens of milliseconds even for multi-GB models.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise GGUFError(f"{p}: cannot read: {exc.strerror}") from None
    if not p.is_file():
        raise GGUFError(f"{p}: not a regular file")
    if st.st_size < 24:
        raise GGUFError(f"{p}: header: file is {st.st_size} bytes, too short for a GGUF header (truncated?)")
    with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _walk(mm, p, st.st_size)


def check_adapter(path: str | os.PathLike, model: GGUFSummary) -> GGUFSummary:
    """Validate a GGUF LoRA adapter (`crofter convert-lora`) for the model `model` summarises:
    a well-formed file, of type adapter/lora, for the same architecture, every weight it adapts
    present in the model with a lora_a and a lora_b of one rank that fit it. GGUFError names the
    file and field (llama.cpp's own refusal would name only the model)."""
    if Path(path).is_dir():
        raise GGUFError(f"{path}: a folder (a peft adapter?); convert it first: crofter convert-lora {path} --base HF_DIR")
    s = check_gguf(path)
    p, meta = s.path, s.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise GGUFError(f"{p}: general.type: not a LoRA adapter ({meta.get('general.type') or 'a model'}; "
                        "make one with crofter convert-lora)")
    arch, want = meta.get("general.architecture"), model.metadata.get("general.architecture")
    if arch != want:
        raise GGUFError(f"{p}: general.architecture: the adapter is for {arch!r}, the model {model.path.name} is {want!r}")
    parts: dict[str, dict[str, list]] = {}
    for name, (shape, _t, _o, _n) in s.tensors.items():
        base, sep, part = name.rpartition(".lora_")
        if not sep or part not in ("a", "b"):
            raise GGUFError(f"{p}: tensor {name!r}: not a LoRA tensor (WEIGHT.lora_a or WEIGHT.lora_b)")
        if base not in model.tensors:
            raise GGUFError(f"{p}: tensor {name!r}: no weight {base!r} in {model.path.name} for it to adapt")
        parts.setdefault(base, {})[part] = list(shape)
    for base, ab in parts.items():
        if set(ab) != {"a", "b"}:
            raise GGUFError(f"{p}: tensor {base!r}: lora_{''.join(ab)} without its lora_{'b' if 'a' in ab else 'a'}")
        # GGUF shapes run innermost first: the weight (in, out), lora_a (in, r), lora_b (r, out).
        a, b, w = ab["a"], ab["b"], model.tensors[base][0]
        if len(a) != 2 or len(b) != 2 or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
            raise GGUFError(f"{p}: tensor {base!r}: lora_a {a} and lora_b {b} do not fit the weight {list(w)} "
                            "(an adapter for another model size?)")
    if not parts:
        raise GGUFError(f"{p}: no LoRA tensors")
    return s
