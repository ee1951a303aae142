"""HF safetensors checkpoint -> GGUF (f32, f16, bf16 or q8_0), written with the `gguf` package.

    >>> convert("~/models/SmolLM2-135M-Instruct", "smol-f16.gguf", "f16")   # doctest: +SKIP

Two passes over the shards: the first reads only tensor shapes (to write the GGUF
header and tensor table), the second streams one tensor at a time into the file, so
memory stays near one tensor. The output is written to a temp file in the target
folder and renamed into place only after it is complete and validated.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .hf import Checkpoint, ConvertError, open_checkpoint
from .tensor_write import write_tensors
from .vocab import Vocab, load_vocab

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# A probe corpus for tokenizer parity: code, Unicode, whitespace runs, digits, contractions,
# special tokens and text that byte-level BPE splits in different places per pre-tokenizer.
PROBE = [
    "Hello world! It's a test; we'll see, they're fine.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tindented\ttabs",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000 0x1F",
    "Ünïcödé: café naïve résumé — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 Ελληνικά русский",
    "Emoji 🙂👍🏽 and symbols ©®™ ∑∫√ ≤≥ ← →",
    "   leading spaces, trailing spaces   \n\n\n   multiple\n\nnewlines\r\nwindows",
    "CamelCaseWords snake_case_words kebab-case-words URLs https://example.org/a?b=c&d=e",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'M SHOUTING, DON'T YOU'VE HEARD? 's 't 're 've 'm 'll 'd",
    "a\u00a0b\u2009c\u200bd  e",
]


@dataclass
class ConvertResult:
    path: Path
    outtype: str
    tensors: int
    pre_tokenizer: str
    seconds: float


def _arch(name: str):
    import gguf

    for arch, n in gguf.MODEL_ARCH_NAMES.items():
        if n == name:
            return arch
    raise ConvertError(f"gguf has no architecture {name!r}")  # pragma: no cover


def _add_metadata(w, ck: Checkpoint, vocab: Vocab, pre: str, ftype: int, name: str) -> None:
    c = ck.config
    w.add_name(name)
    # Where the weights came from, so `crofter quantize --calibration` and `crofter verify`
    # can find the HF checkpoint again without being told.
    w.add_string("crofter.source.hf_dir", str(ck.folder.resolve()))
    w.add_context_length(int(c.get("max_position_embeddings") or 4096))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(ck.n_layers)
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(ck.n_head)
    if ck.plan.gguf_arch == "gpt2":  # learned positions and LayerNorm: no RoPE or RMS keys
        w.add_layer_norm_eps(float(c.get("layer_norm_epsilon") or 1e-5))
    else:
        _add_rope_hparams(w, ck)
    if ck.plan.gguf_arch == "gemma3":
        w.add_sliding_window(int(c.get("sliding_window") or 4096))
    w.add_vocab_size(len(vocab.tokens))
    w.add_file_type(ftype)
    _add_vocab(w, vocab, pre)


def _add_rope_hparams(w, ck: Checkpoint) -> None:
    import gguf

    c = ck.config
    w.add_head_count_kv(ck.n_head_kv)
    w.add_rope_dimension_count(ck.head_dim)
    if ck.head_dim * ck.n_head != int(c["hidden_size"]):
        w.add_key_length(ck.head_dim)
        w.add_value_length(ck.head_dim)
    w.add_rope_freq_base(ck.rope_theta())
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps") or 1e-6))
    rs = ck.rope_scaling()
    if rs is not None:
        kind = rs["rope_type"]
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rs["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        elif kind != "llama3":  # llama3 travels as the rope_freqs tensor
            raise ConvertError(f"{ck.folder}/config.json: rope scaling {kind!r} is not supported "
                               "(crofter converts linear, yarn and llama3)")


def _add_vocab(w, vocab: Vocab, pre: str) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.scores:
        w.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    for key, tid in vocab.special.items():
        getattr(w, f"add_{key}_token_id")(tid)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def llama3_rope_factors(ck: Checkpoint) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1-style RoPE scaling, shape (head_dim/2,).

    High frequencies (wavelength < original_ctx / high_freq_factor) keep their value,
    low ones (wavelength > original_ctx / low_freq_factor) are divided by `factor`, and
    the band between is interpolated smoothly (Meta's Llama 3.1 reference code)."""
    rs = ck.rope_scaling()
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs["original_max_position_embeddings"])
    d = ck.head_dim
    freqs = 1.0 / (ck.rope_theta() ** (np.arange(0, d, 2, dtype=np.float64) / d))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass
class _Planned:
    shard: Path
    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int


def _plan(ck: Checkpoint, outtype: str) -> list[_Planned]:
    import gguf
    from safetensors import safe_open

    tmap = gguf.get_tensor_name_map(_arch(ck.plan.gguf_arch), ck.n_layers)
    want = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    plan = []
    for shard in ck.shards:
        with safe_open(str(shard), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith(("rotary_emb.inv_freq", ".masked_bias", ".attn.bias")):
                    continue  # buffers recomputed at load time
                name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ConvertError(f"{shard.name}: tensor {hf_name!r} has no llama.cpp name for "
                                       f"{ck.arch_name}; refusing to write an incomplete model")
                shape = tuple(f.get_slice(hf_name).get_shape())
                if len(shape) == 2 and hf_name.endswith(ck.plan.transpose):
                    shape = shape[::-1]  # Conv1D (in, out) is written as (out, in)
                qtype = want if len(shape) == 2 else gguf.GGMLQuantizationType.F32
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                if shape[-1] % block:
                    qtype = gguf.GGMLQuantizationType.F16  # rows Q8_0 cannot block evenly
                    block, size = gguf.GGML_QUANT_SIZES[qtype]
                n = int(np.prod(shape))
                plan.append(_Planned(shard, hf_name, name, shape, qtype, n // block * size))
    return plan


def write_gguf(ck: Checkpoint, vocab: Vocab, pre: str, path: Path, outtype: str, *, vocab_only: bool = False,
               name: str | None = None, on_tensor: Callable[[int, int, str], None] | None = None) -> int:
    """Write the GGUF to `path` (not atomically: callers pass a temp path). Returns the tensor count."""
    import gguf

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w = gguf.GGUFWriter(str(path), ck.plan.gguf_arch)
    _add_metadata(w, ck, vocab, pre, int(ftype), name or ck.folder.name)
    plan = [] if vocab_only else _plan(ck, outtype)
    extra = []
    if not vocab_only and (ck.rope_scaling() or {}).get("rope_type") == "llama3":
        factors = llama3_rope_factors(ck)
        extra.append(("rope_freqs.weight", factors))
    for nm, arr in extra:
        w.add_tensor_info(nm, arr.shape, arr.dtype, arr.nbytes)
    for p in plan:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, arr in extra:
        w.write_tensor_data(arr)
    try:
        write_tensors(w, ck, plan, on_tensor)
    except BaseException:
        for fh in w.fout or []:  # close without the writer's flush, so nothing is written after a failure
            with contextlib.suppress(OSError):
                fh.close()
        raise
    w.close()
    return len(plan) + len(extra)


def hf_token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def gguf_token_ids(llm, text: str, special: bool = True) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                        special=special)


def reference_tokenizer(folder: Path, vocab: Vocab, hf_tokenizer=None):
    """`text -> ids` of the tokenizer the model was trained with: sentencepiece itself for a
    tokenizer.model (HF's fast conversions of those drift on runs of spaces), else HF's."""
    if vocab.spm_model is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(vocab.spm_model))
        bos = [sp.bos_id()] if vocab.add_bos and sp.bos_id() >= 0 else []
        return lambda text: bos + list(sp.encode(text))
    tok = hf_tokenizer or load_hf_tokenizer(folder)
    return lambda text: hf_token_ids(tok, text)


def load_hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@contextlib.contextmanager
def native_stderr_quiet(enabled: bool = True):
    """Silence what C code writes to fd 2 (llama.cpp's context warnings for vocab-only loads)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def vocab_only_llama(path: Path):
    import llama_cpp

    with native_stderr_quiet():
        return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def pick_pre_tokenizer(ck: Checkpoint, vocab: Vocab, tokenizer=None) -> str:
    """The first llama.cpp pre-tokenizer under which a vocab-only GGUF tokenizes PROBE
    exactly as the HF tokenizer does; ConvertError when none does."""
    reference = reference_tokenizer(ck.folder, vocab, tokenizer)
    want = [reference(t) for t in PROBE]
    with tempfile.TemporaryDirectory(prefix="crofter-vocab-") as tmp:
        for pre in vocab.pre_candidates:
            path = Path(tmp) / f"{pre}.gguf"
            write_gguf(ck, vocab, pre, path, "f16", vocab_only=True)
            try:
                llm = vocab_only_llama(path)
            except Exception:
                continue  # this llama.cpp build does not know the name
            try:
                if [gguf_token_ids(llm, t, special=vocab.spm_model is None) for t in PROBE] == want:
                    return pre
            finally:
                llm.close()
    hint = ""
    if vocab.spm_model is not None:
        hint = (" (llama.cpp does not apply sentencepiece's normalizer: a tokenizer.model that normalizes text, "
                f"here rule {vocab.spm_normalizer!r}, cannot be reproduced)")
    raise ConvertError(f"{ck.folder}: no llama.cpp pre-tokenizer reproduces this tokenizer on the probe corpus "
                       f"(tried {', '.join(vocab.pre_candidates)}){hint}; refusing to write a model that would "
                       "tokenize differently")


def convert(folder: str | Path, out: str | Path | None = None, outtype: str = "f16",
            on_tensor: Callable[[int, int, str], None] | None = None) -> ConvertResult:
    """Convert an HF checkpoint folder to a GGUF file at `out` (atomically)."""
    from models.gguf_check import check_gguf

    from .output import output_file

    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    t0 = time.monotonic()
    ck = open_checkpoint(folder)
    vocab = load_vocab(ck.folder, int(ck.config["vocab_size"]), ck.config)
    pre = pick_pre_tokenizer(ck, vocab)
    out = Path(out) if out else ck.folder.parent / f"{ck.folder.name}-{outtype.upper()}.gguf"
    with output_file(out) as tmp:
        n = write_gguf(ck, vocab, pre, tmp, outtype, on_tensor=on_tensor)
        check_gguf(tmp)  # the same structural validation every load gets
        os.chmod(tmp, 0o644)  # temp files are created 0600
    return ConvertResult(out, outtype, n, pre, time.monotonic() - t0)
