"""Header surgery on a real GGUF: replace or drop metadata, keep the tensor data.

Tests use it to plant one defect in the bundled model (a vocabulary attack, a bad
field) while everything else stays exactly as llama.cpp expects. The tensor data
is either copied or, with ``sparse=True``, left as a hole of the right size: the
file then passes the size checks and costs no disk, which suits defects that
llama.cpp trips over before it reads a single weight.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

from gguf.constants import GGUFValueType

from models.gguf_check import check_gguf
from tests import gguf_build as gb

_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype == GGUFValueType.STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == GGUFValueType.ARRAY:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item == GGUFValueType.STRING:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
            return pos
        return pos + count * _SIZES[GGUFValueType(item)]
    return pos + _SIZES[GGUFValueType(vtype)]


def split_header(path: Path) -> tuple[dict[str, bytes], bytes, int, int]:
    """(key -> raw KV bytes in file order, raw tensor infos, n_tensors, data offset)
    of a GGUF that check_gguf accepts."""
    summary = check_gguf(path)
    with open(path, "rb") as fh:
        buf = fh.read(summary.data_offset)
    _magic, _version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    pos = 24
    kvs: dict[str, bytes] = {}
    for _ in range(n_kv):
        start = pos
        (klen,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8 : pos + 8 + klen].decode()
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos = _skip_value(buf, pos + 4, vtype)
        kvs[key] = buf[start:pos]
    infos_end = summary.data_offset
    # Tensor infos run from here to the padding before the data; strip the padding.
    infos = buf[pos:infos_end]
    info_len = 0
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", infos, info_len)
        info_len += 8 + nlen
        (n_dims,) = struct.unpack_from("<I", infos, info_len)
        info_len += 4 + 8 * n_dims + 4 + 8
    return kvs, infos[:info_len], n_tensors, summary.data_offset


def rewrite(src: Path, dst: Path, replace: dict[str, bytes | None], sparse: bool = False) -> Path:
    """Copy GGUF `src` to `dst` with the KVs in `replace` swapped (raw KV bytes from
    tests.gguf_build, e.g. ``gb.kv_u32(key, 7)``) or dropped (None); new keys are appended."""
    kvs, infos, n_tensors, data_offset = split_header(src)
    for key, raw in replace.items():
        if raw is None:
            kvs.pop(key, None)
        else:
            kvs[key] = raw
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs.values()) + infos
    head += b"\0" * (-len(head) % 32)
    data_size = src.stat().st_size - data_offset
    with open(dst, "wb") as out:
        out.write(head)
        if sparse:
            out.truncate(len(head) + data_size)
        else:
            with open(src, "rb") as fh:
                fh.seek(data_offset)
                shutil.copyfileobj(fh, out, 1 << 20)
    return dst


def kv_array(key: str, item_type: GGUFValueType, payload: bytes, count: int) -> bytes:
    """A raw array KV of `count` items whose encoded bytes are `payload`."""
    return gb.s(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, item_type, count) + payload
