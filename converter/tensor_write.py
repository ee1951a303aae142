"""The tensor data of a GGUF, written one tensor at a time from the safetensors shards.

Each tensor is read, checked (finite; within F16's range when written as F16), laid out as
llama.cpp wants it (Conv1D transposed, q/k rows permuted for RoPE, Gemma's norms as w + 1)
and encoded. A large tensor that needs no transposing or permuting (the token embedding, an
untied output) is read and encoded in row blocks, so the peak memory is a block's, not the
tensor's: a 49,152 x 768 float32 embedding would otherwise hold 144 MiB plus its F16 copy
(and the shard's mapped pages, which count as resident until the shard is closed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .hf import ConvertError, permute_rows

F16_MAX = 65504.0  # the largest finite float16
BLOCK_BYTES = 16 << 20  # float32 bytes read per row block of a large tensor


def check_finite(arr: np.ndarray, shard: Path, name: str, row0: int = 0) -> None:
    """ConvertError naming the tensor when `arr` holds NaN or Inf (a diverged or corrupt
    checkpoint); `arr` is the tensor as stored, or its rows from `row0` on, so the position
    named is the checkpoint's own."""
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) + (row0 if k == 0 else 0) for k, i in enumerate(np.argwhere(bad)[0]))
        raise ConvertError(f"{shard.name}: tensor {name!r} has {int(bad.sum())} NaN/Inf values (first at {first}); "
                           "refusing to convert non-finite weights")


def encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def _pieces(f, p, ck):
    """The tensor as llama.cpp lays it out, whole or in row blocks (each encodes on its own:
    F16 and Q8_0 work row by row)."""
    rows = p.shape[0] if p.shape else 1
    row_bytes = 4 * int(np.prod(p.shape[1:])) if len(p.shape) > 1 else 4
    reshaped = (len(p.shape) == 2 and p.hf_name.endswith(ck.plan.transpose)) or \
        (ck.plan.permute_qk and (".q_proj." in p.hf_name or ".k_proj." in p.hf_name))
    if reshaped or len(p.shape) != 2 or rows * row_bytes <= BLOCK_BYTES:
        arr = f.get_tensor(p.hf_name).float().numpy()
        check_finite(arr, p.shard, p.hf_name)
        if arr.ndim == 2 and p.hf_name.endswith(ck.plan.transpose):
            arr = arr.T
        if ck.plan.permute_qk and (".q_proj." in p.hf_name or ".k_proj." in p.hf_name):
            arr = permute_rows(arr, ck.n_head if ".q_proj." in p.hf_name else ck.n_head_kv)
        yield arr
        return
    from safetensors import safe_open

    step = max(1, BLOCK_BYTES // row_bytes)
    for i in range(0, rows, step):
        # The shard is opened per block too: its mapped pages count as resident until it closes.
        with safe_open(str(p.shard), framework="pt") as g:
            block = g.get_slice(p.hf_name)[i:i + step].float().numpy()
        check_finite(block, p.shard, p.hf_name, row0=i)
        yield block


def write_tensors(w, ck, plan: list, on_tensor) -> None:
    """Every planned tensor's data into the GGUFWriter `w`, after its header and tensor infos."""
    import gguf
    from safetensors import safe_open

    for done, p in enumerate(plan, 1):
        # Open the shard per tensor: safetensors maps the file, and every page a tensor
        # touched would otherwise stay resident until the shard is closed.
        with safe_open(str(p.shard), framework="pt") as f:
            fout, written = _begin(w, p.name, p.nbytes), 0
            for arr in _pieces(f, p, ck):  # each piece checked finite in _pieces
                if p.qtype == gguf.GGMLQuantizationType.F16 and arr.size and float(np.abs(arr).max()) > F16_MAX:
                    raise ConvertError(f"{p.shard.name}: tensor {p.hf_name!r} has values up to "
                                       f"{float(np.abs(arr).max()):.4g}, beyond F16's range (±{F16_MAX:g}); "
                                       "convert with --outtype bf16 or f32")
                if ck.plan.norm_plus_one and p.hf_name.endswith("norm.weight"):
                    arr = arr + 1.0
                data = encode(arr, p.qtype)
                data.tofile(fout)
                written += data.nbytes
                del arr, data
        if written != p.nbytes:
            raise ConvertError(f"{p.shard.name}: tensor {p.hf_name!r} encoded to {written} bytes, planned {p.nbytes}")
        w.write_padding(fout, written)
        if on_tensor:
            on_tensor(done, len(plan), p.name)


def _begin(w, name: str, nbytes: int):
    """GGUFWriter.write_tensor_data's bookkeeping for one tensor written in pieces: its info is
    taken from the writer's queue and the file is padded to the tensor's alignment. (The
    writer's own call takes one whole array, which is what this module avoids holding.)"""
    import sys

    from gguf.constants import GGUFEndian
    from gguf.gguf_writer import WriterState

    if w.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
        raise ValueError(f"expected tensor info or weights, got {w.state}")
    if (w.endianess == GGUFEndian.BIG) != (sys.byteorder == "big"):
        raise ValueError("the GGUF's byte order differs from this machine's; pieces are written as they are")
    file_id = next((i for i, tensors in enumerate(w.tensors) if tensors), None)
    if file_id is None:
        raise ValueError(f"tensor {name}: no tensor info left to write it under")
    fout = w.fout[file_id]
    queued = next(iter(w.tensors[file_id]))
    info = w.tensors[file_id].pop(queued)
    if queued != name or info.nbytes != nbytes:
        raise ValueError(f"tensor {name} ({nbytes} bytes) written where {queued} ({info.nbytes} bytes) was planned")
    w.write_padding(fout, fout.tell())
    w.state = WriterState.WEIGHTS
    return fout
