"""GGUF quantization through llama.cpp's own quantizer (as llama-cpp-python exposes it).

    >>> quantize("smol-f16.gguf", "smol-q4_k_m.gguf", "Q4_K_M")       # doctest: +SKIP

Parameters start from `llama_model_quantize_default_params()`; fields are set by
name and the type explicitly. An importance matrix (converter.imatrix) is handed over
as a NULL-terminated array of {tensor name, per-column importance, length}.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .hf import ConvertError

TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0")
# Rough bits per weight, only for the progress estimate.
_BPW = {"Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q5_K_M": 5.7, "Q6_K": 6.6, "Q8_0": 8.5}
SOURCE_KEY = "crofter.source.hf_dir"  # written by `crofter convert`: where the HF checkpoint lives


@dataclass
class QuantizeResult:
    path: Path
    qtype: str
    seconds: float
    size_bytes: int
    imatrix_tensors: int = 0


def _ftype(qtype: str) -> int:
    import llama_cpp

    name = f"LLAMA_FTYPE_MOSTLY_{qtype}"
    if qtype not in TYPES or not hasattr(llama_cpp, name):
        raise ConvertError(f"--type {qtype}: choose one of {', '.join(TYPES)}")
    return int(getattr(llama_cpp, name))


def _imatrix_array(imatrix: dict[str, np.ndarray]):
    """A ctypes array of llama_model_imatrix_data ending with a NULL name, plus the
    objects that must stay alive while llama.cpp reads it."""
    import llama_cpp

    entries = sorted(imatrix.items())
    arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    keep = []
    for i, (name, values) in enumerate(entries):
        v = np.ascontiguousarray(values, dtype=np.float32)
        if not np.all(np.isfinite(v)):
            raise ConvertError(f"importance matrix for {name} has non-finite values")
        b = name.encode()
        keep += [v, b]
        arr[i].name = b
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    return arr, keep


def quantize(inp: str | Path, out: str | Path, qtype: str = "Q4_K_M", *, imatrix: dict[str, np.ndarray] | None = None,
             threads: int = 0, on_progress: Callable[[int, int], None] | None = None,
             quiet: bool = True) -> QuantizeResult:
    """Quantize `inp` (an F32/F16/BF16 GGUF) to `out` atomically; `on_progress(bytes_written, estimate)`."""
    import llama_cpp

    from models.gguf_check import check_gguf

    from .output import output_file, space_cause, write_error

    inp, out = Path(inp), Path(out)
    ftype = _ftype(qtype)
    summary = check_gguf(inp)
    kinds = {t.name for _shape, t, _off, _nb in summary.tensors.values()}
    if kinds - {"F32", "F16", "BF16"}:
        raise ConvertError(f"{inp}: already quantized ({', '.join(sorted(kinds - {'F32', 'F16', 'BF16'}))}); "
                           "quantize from the F16/BF16/F32 GGUF that `crofter convert` writes")
    if inp.resolve() == out.resolve():
        raise ConvertError("the output must differ from the input")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or len(os.sched_getaffinity(0))
    keep = None
    if imatrix:
        arr, keep = _imatrix_array(imatrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    estimate = int(summary.n_params * _BPW[qtype] / 8)
    t0 = time.monotonic()
    with output_file(out) as tmp:
        done = threading.Event()

        def watch() -> None:  # llama.cpp has no progress callback: follow the file as it grows
            while not done.wait(0.25):
                try:
                    on_progress(tmp.stat().st_size, estimate)
                except OSError:
                    pass

        watcher = threading.Thread(target=watch, daemon=True) if on_progress else None
        if watcher:
            watcher.start()
        from .convert import native_stderr_quiet

        try:
            # llama.cpp logs a line per tensor (and one per fallback type); keep its errors for the message.
            with native_stderr_quiet(quiet), llama_errors(echo=not quiet) as errors:
                rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(tmp).encode(), ctypes.byref(params))
        finally:
            done.set()
            if watcher:
                watcher.join()
        if rc != 0:
            cause = space_cause(tmp, estimate)
            if cause:
                raise write_error(out, cause)
            said = "; ".join(errors)[-300:] or f"error {rc}"
            raise ConvertError(f"llama.cpp could not quantize {inp} to {qtype}: {said}")
        check_gguf(tmp)
        os.chmod(tmp, 0o644)
    del keep
    if on_progress:
        on_progress(out.stat().st_size, out.stat().st_size)
    return QuantizeResult(out, qtype, time.monotonic() - t0, out.stat().st_size, len(imatrix or {}))


@contextlib.contextmanager
def llama_errors(echo: bool = False) -> Iterator[list[str]]:
    """Collect what llama.cpp logs at ERROR level (its reason when a call fails) while the block
    runs, then give logging back to llama-cpp-python. With `echo` every log line still prints."""
    import sys

    import llama_cpp
    from llama_cpp import _logger

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _user) -> None:
        line = text.decode("utf-8", errors="replace")
        if level == 3 and line.strip():  # GGML_LOG_LEVEL_ERROR
            errors.append(line.strip())
        if echo:
            print(line, end="", file=sys.stderr, flush=True)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
