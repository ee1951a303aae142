"""A nanoGPT checkpoint (``ckpt.pt``) -> an HF GPT-2 folder: safetensors, config and the user's tokenizer.

    >>> import_nanogpt("out/ckpt.pt", "gpt2-tokenizer/", "my-gpt2")    # doctest: +SKIP

nanoGPT (karpathy/nanoGPT, train.py) saves ``{"model": state_dict, "model_args": {n_layer,
n_head, n_embd, block_size, bias, vocab_size, dropout}, "iter_num", "best_val_loss", "config",
"optimizer"}``. Its GPT is GPT-2's graph with three differences from HF's ``GPT2LMHeadModel``:

- ``nn.Linear`` weights are (out, in); HF's Conv1D keeps (in, out): every c_attn, c_proj and
  c_fc weight is transposed;
- ``bias=False`` models have no LayerNorm or Linear biases: they get zero biases, which
  compute the same thing;
- a compiled model's keys carry ``_orig_mod.``; it is stripped. The causal-mask buffer
  (``attn.bias``, (1, 1, T, T), saved when flash attention is off) is dropped.

The activation is exact GELU (``nn.GELU()``), so the config says ``"gelu"`` (HF's default
for GPT-2 is the tanh form, which would differ by up to ~1e-3 per activation).

Vocabulary: nanoGPT pads GPT-2's 50257 tokens to 50304 rows (a multiple of 64, for speed);
no token has the extra ids. The import keeps the tokenizer's size and drops those rows from
the embedding (and the tied output), so the model, the HF tokenizer and the GGUF written
from them all have one size and no id can be generated that decodes to nothing. A
checkpoint whose vocab_size is smaller than the tokenizer, or larger by 128 or more (more
than padding), is refused: it was not trained with that tokenizer.

Only ``torch.load(weights_only=True)`` is used: a checkpoint that needs arbitrary unpickling
(a class of the training script, say) is refused, naming what it wanted to import.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

from .hf import ConvertError

PREFIX = "_orig_mod."  # torch.compile's wrapper
MAX_PADDING = 128  # more extra rows than this is not padding: the tokenizer is the wrong one
_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


@dataclass
class ImportResult:
    path: Path
    n_params: int
    n_layer: int
    n_embd: int
    block_size: int
    bias: bool
    vocab_tokenizer: int  # the tokenizer's size: the model's vocab_size now
    vocab_checkpoint: int  # the checkpoint's (padded) vocab_size
    stripped_prefix: bool
    iter_num: int | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["path"] = str(self.path)
        return d


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, read with weights_only=True (tensors and plain containers only)."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it needs {wanted.group(1)}" if wanted else _first_line(exc)
        raise ConvertError(f"{path}: refused: loading it needs arbitrary unpickling ({what}), which can run code; "
                           "crofter reads checkpoints with torch.load(weights_only=True) only: tensors, numbers, "
                           "strings and containers") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConvertError(f"{path}: not a complete PyTorch checkpoint (truncated or corrupt: {_first_line(exc)})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or not isinstance(obj.get("model_args"), dict):
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ConvertError(f"{path}: not a nanoGPT checkpoint (expected a dict with 'model' and 'model_args'; got {keys})")
    return obj


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to several lines of advice)."""
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0][:200] if text else type(exc).__name__


def _model_args(path: Path, args: dict) -> dict:
    out = {}
    for key in _ARGS:
        value = args.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConvertError(f"{path}: model_args[{key!r}] missing or not a positive integer (got {value!r})")
        out[key] = value
    if out["n_embd"] % out["n_head"]:
        raise ConvertError(f"{path}: model_args n_embd {out['n_embd']} is not divisible by n_head {out['n_head']}")
    out["bias"] = bool(args.get("bias", True))
    dropout = args.get("dropout", 0.0)
    out["dropout"] = float(dropout) if isinstance(dropout, (int, float)) else 0.0
    return out


def _expected(a: dict) -> dict[str, tuple[int, ...]]:
    """nanoGPT's parameter names and shapes (its layout: Linear weights are (out, in))."""
    c, v = a["n_embd"], a["vocab_size"]
    shapes = {"transformer.wte.weight": (v, c), "transformer.wpe.weight": (a["block_size"], c),
              "transformer.ln_f.weight": (c,)}
    for i in range(a["n_layer"]):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.weight": (c,), h + "attn.c_attn.weight": (3 * c, c), h + "attn.c_proj.weight": (c, c),
                       h + "ln_2.weight": (c,), h + "mlp.c_fc.weight": (4 * c, c), h + "mlp.c_proj.weight": (c, 4 * c)})
    if a["bias"]:
        for name in list(shapes):
            if name.endswith("ln_f.weight") or re.search(r"\.(ln_[12]|c_attn|c_proj|c_fc)\.weight$", name):
                shapes[name[: -len("weight")] + "bias"] = (shapes[name][0],)
    return shapes


def hf_state_dict(path: Path, state: dict, a: dict, n_vocab: int) -> tuple[dict, bool]:
    """nanoGPT's state dict -> GPT2LMHeadModel's (float32), and whether lm_head is tied."""
    import torch

    expected = _expected(a)
    for name, shape in expected.items():
        t = state.get(name)
        if not isinstance(t, torch.Tensor):
            raise ConvertError(f"{path}: tensor {name!r} missing (model_args say n_layer={a['n_layer']}, "
                               f"bias={a['bias']})")
        if tuple(t.shape) != shape:
            raise ConvertError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, model_args imply {shape}")
    for name in state:
        if name not in expected and name != "lm_head.weight" and not re.fullmatch(r"transformer\.h\.\d+\.attn\.bias", name):
            raise ConvertError(f"{path}: unexpected tensor {name!r}: not nanoGPT's GPT layout")
    c = a["n_embd"]
    out = {}
    for name, shape in expected.items():
        t = state[name].float()
        if name.endswith("wte.weight"):
            t = t[:n_vocab]
        elif len(shape) == 2 and not name.endswith("wpe.weight"):
            t = t.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        out[name] = t.contiguous()
    if not a["bias"]:
        for i in range(a["n_layer"]):
            h = f"transformer.h.{i}."
            for name, n in (("ln_1", c), ("ln_2", c), ("attn.c_attn", 3 * c), ("attn.c_proj", c), ("mlp.c_fc", 4 * c),
                            ("mlp.c_proj", c)):
                out[h + name + ".bias"] = torch.zeros(n)
        out["transformer.ln_f.bias"] = torch.zeros(c)
    head = state.get("lm_head.weight")
    tied = head is None or torch.equal(head, state["transformer.wte.weight"])
    out["lm_head.weight"] = out["transformer.wte.weight"] if tied else head.float()[:n_vocab].contiguous()
    return out, tied


def import_nanogpt(checkpoint: str | Path, tokenizer_dir: str | Path, out: str | Path) -> ImportResult:
    """Write an HF GPT-2 folder at `out` (atomically) from a nanoGPT checkpoint and a tokenizer folder."""
    from models.atomic import atomic_dir

    path, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if out.exists():
        raise ConvertError(f"{out} exists; choose a new --out")
    tok = _tokenizer(Path(tokenizer_dir).expanduser())
    obj = load_checkpoint(path)
    a = _model_args(path, obj["model_args"])
    stripped = any(k.startswith(PREFIX) for k in obj["model"])
    state = {k.removeprefix(PREFIX): v for k, v in obj["model"].items()}
    n_vocab, v = len(tok), a["vocab_size"]
    if not 0 <= v - n_vocab < MAX_PADDING:
        raise ConvertError(f"{path}: vocab_size {v} does not fit the tokenizer in {tokenizer_dir} ({n_vocab} tokens; "
                           f"nanoGPT pads by fewer than {MAX_PADDING} rows): pass the tokenizer the model was trained with")
    sd, tied = hf_state_dict(path, state, a, n_vocab)
    notes = []
    if v > n_vocab:
        notes.append(f"vocabulary: kept the tokenizer's {n_vocab} rows of the checkpoint's {v} "
                     f"(dropped {v - n_vocab} padding rows no token uses)")
    if not a["bias"]:
        notes.append("bias=False: zero biases added (the same function)")
    if stripped:
        notes.append(f"stripped the {PREFIX!r} prefix of a compiled model")
    model = _gpt2(a, n_vocab, tok, tied)
    model.load_state_dict(sd, strict=True)
    iter_num = obj.get("iter_num") if isinstance(obj.get("iter_num"), int) else None
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            (tmp / "crofter_import.json").write_text(json.dumps({
                "source": str(path.resolve()), "format": "nanogpt", "iter_num": iter_num,
                "model_args": obj["model_args"], "notes": notes}, indent=2, default=str))
    except FileExistsError:
        raise ConvertError(f"{out} appeared while importing; choose a new --out") from None
    except OSError as exc:
        raise ConvertError(f"{out}: writing the imported model failed ({exc.strerror or exc}); nothing was left there") from None
    n_params = sum(p.numel() for p in model.parameters())
    return ImportResult(out, n_params, a["n_layer"], a["n_embd"], a["block_size"], a["bias"], n_vocab, v, stripped,
                        iter_num, notes)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not folder.is_dir():
        raise ConvertError(f"--tokenizer {folder}: not a folder (expected an HF tokenizer folder, e.g. GPT-2's)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for an unreadable folder
        raise ConvertError(f"--tokenizer {folder}: not a readable HF tokenizer ({_first_line(exc)})") from None
    if not getattr(tok, "is_fast", False):
        raise ConvertError(f"--tokenizer {folder}: no fast tokenizer (tokenizer.json) could be built from it")
    return tok


def _gpt2(a: dict, n_vocab: int, tok, tied: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tok.eos_token_id
    cfg = GPT2Config(vocab_size=n_vocab, n_positions=a["block_size"], n_embd=a["n_embd"], n_layer=a["n_layer"],
                     n_head=a["n_head"], activation_function="gelu", resid_pdrop=a["dropout"],
                     embd_pdrop=a["dropout"], attn_pdrop=a["dropout"], layer_norm_epsilon=1e-5,
                     bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=tied)
    cfg.architectures = ["GPT2LMHeadModel"]
    return GPT2LMHeadModel(cfg)
