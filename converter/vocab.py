"""The tokenizer of an HF checkpoint as GGUF metadata: tokens, types, merges, special ids, template.

Byte-level BPE (``tokenizer.json`` with a BPE model and a ByteLevel pre-tokenizer, as in
Llama 3, SmolLM, Qwen2) becomes llama.cpp's ``gpt2`` tokenizer model. Which
pre-tokenizer regex llama.cpp must use (``tokenizer.ggml.pre``) is not guessed: the
converter tries candidates and keeps the first that tokenizes a probe corpus exactly
like the HF tokenizer (see convert.pick_pre_tokenizer). Anything else is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .hf import ConvertError

# llama.cpp token types (gguf.TokenType): written as plain ints.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    pre_candidates: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # SentencePiece piece scores
    add_space_prefix: bool | None = None  # SentencePiece's add_dummy_prefix
    spm_model: Path | None = None  # the tokenizer.model parity is checked against
    spm_normalizer: str = ""  # its normalization rule and whitespace handling, for error messages


# llama.cpp pre-tokenizer names, most likely first for each pre_tokenizer shape.
_BYTELEVEL_ONLY = ["gpt-2", "default"]
_DIGITS_THEN_BYTELEVEL = ["smollm", "starcoder", "refact"]
_SPLIT_THEN_BYTELEVEL = ["llama-bpe", "qwen2", "smaug-bpe", "deepseek-llm", "deepseek-coder", "dbrx", "olmo",
                         "stablelm2", "command-r", "tekken", "gpt-4o", "falcon", "mpt", "jais", "bloom"]


def _pre_candidates(pre: dict | None) -> list[str]:
    if not pre:
        return []
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return _BYTELEVEL_ONLY + _SPLIT_THEN_BYTELEVEL
    if kind == "Sequence":
        kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
        if "ByteLevel" not in kinds:
            return []
        if "Digits" in kinds:
            return _DIGITS_THEN_BYTELEVEL + _BYTELEVEL_ONLY + _SPLIT_THEN_BYTELEVEL
        return _SPLIT_THEN_BYTELEVEL + _DIGITS_THEN_BYTELEVEL + _BYTELEVEL_ONLY
    return []


def load_vocab(folder: Path, vocab_size: int, config: dict) -> Vocab:
    tj = folder / "tokenizer.json"
    tok = None
    if tj.is_file():
        try:
            tok = json.loads(tj.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConvertError(f"{tj}: not valid JSON ({exc})") from None
    tcfg = _read_json(folder / "tokenizer_config.json")
    model = (tok or {}).get("model") or {}
    spm_like = model.get("type") == "Unigram" or (model.get("type") == "BPE" and model.get("byte_fallback"))
    if (folder / "tokenizer.model").is_file() and (tok is None or spm_like):
        return _sentencepiece_vocab(folder, vocab_size, config, tcfg, tok)
    if tok is None:
        raise ConvertError(f"{folder}: no tokenizer.json")
    if model.get("type") != "BPE":
        raise ConvertError(f"{tj}: tokenizer model {model.get('type')!r} is not supported (crofter converts "
                           "byte-level BPE tokenizers: Llama 3, SmolLM, Qwen2, Mistral Nemo and similar)")
    candidates = _pre_candidates(tok.get("pre_tokenizer"))
    if model.get("byte_fallback") or not candidates:
        raise ConvertError(f"{tj}: a SentencePiece-style tokenizer (byte fallback / Metaspace) without its "
                           "tokenizer.model; put the original tokenizer.model next to it to convert it")

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(NORMAL if a is None else (CONTROL if a.get("special") else USER_DEFINED))
        else:  # the embedding matrix is padded past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def token_id(key: str) -> int | None:
        value = tcfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            ids = [i for i, t in by_id.items() if t == value]
            return ids[0] if ids else None
        cid = config.get(f"{key}_id")
        return cid if isinstance(cid, int) else None

    special = {k: v for k in ("bos", "eos", "unk", "pad") if (v := token_id(f"{k}_token")) is not None}
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:  # transformers 5 keeps it in the post-processor template
        add_bos = _template_adds(tok.get("post_processor"), by_id.get(special.get("bos", -1)))
    template = tcfg.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Vocab("gpt2", tokens, types, merges, special, bool(add_bos), bool(tcfg.get("add_eos_token") or False),
                 template, candidates)


USER_DEFINED_PIECE = 4  # sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED


def _sentencepiece_vocab(folder: Path, vocab_size: int, config: dict, tcfg: dict, tok: dict | None) -> Vocab:
    """llama.cpp's ``llama`` (SentencePiece) tokenizer: pieces, scores and types read from
    tokenizer.model itself, added tokens from tokenizer.json; parity is checked against
    sentencepiece (the tokenizer the model was trained with)."""
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ConvertError("converting a SentencePiece tokenizer needs the sentencepiece package") from None
    path = folder / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        # sentencepiece matches a user-defined piece in the escaped text ("▁" for a space),
        # llama.cpp in the raw text: Gemma's whitespace-run pieces must be written with spaces.
        tokens.append(piece.replace("\u2581", " ") if proto.pieces[i].type == USER_DEFINED_PIECE else piece)
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                     else BYTE if sp.is_byte(i) else USER_DEFINED if proto.pieces[i].type == USER_DEFINED_PIECE
                     else NORMAL)
    for a in sorted((tok or {}).get("added_tokens", []), key=lambda a: a["id"]):
        if a["id"] < len(tokens):
            if a["content"] != tokens[a["id"]]:
                raise ConvertError(f"{folder}: added token {a['content']!r} overwrites piece {tokens[a['id']]!r}")
            continue
        while len(tokens) < a["id"]:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(UNUSED)
        tokens.append(a["content"])
        scores.append(-1000.0)
        types.append(CONTROL if a.get("special") else USER_DEFINED)
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    special = {k: v for k, v in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id()))
               if v >= 0}
    template = tcfg.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    add_bos = tcfg.get("add_bos_token")
    norm = proto.normalizer_spec
    rule = f"{norm.name or 'identity'}" + (", remove_extra_whitespaces" if norm.remove_extra_whitespaces else "")
    return Vocab("llama", tokens, types, [], special, True if add_bos is None else bool(add_bos),
                 bool(tcfg.get("add_eos_token") or False), template, ["default"], scores,
                 bool(norm.add_dummy_prefix), path, rule)


def _template_adds(post: dict | None, bos: str | None) -> bool:
    """Whether a TemplateProcessing post-processor puts the BOS token before a single sequence."""
    if not post or bos is None:
        return False
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            return any(isinstance(s, dict) and s.get("SpecialToken", {}).get("id") == bos for s in p.get("single", []))
    return False


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from None
