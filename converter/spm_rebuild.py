"""A SentencePiece `tokenizer.model` rebuilt from a GGUF's own vocabulary.

A GGUF of a SentencePiece model (Gemma, Llama 2, Mistral: `tokenizer.ggml.model` "llama")
carries every piece, its score and its type, which is all a SentencePiece BPE model holds.
transformers' GGUF loader gives only a tokenizer.json, so a model dequantized from such a
GGUF could not be converted back (the converter reads pieces and scores from tokenizer.model,
and checks its tokenization against sentencepiece itself). Writing the model proto from the
GGUF's fields closes that loop: dequantize -> train -> convert works for Gemma 3.

llama.cpp's SentencePiece tokenizer merges by score, as SentencePiece's BPE does, so the proto
is a BPE model; the normalizer is the identity (llama.cpp applies none), with the GGUF's
`add_space_prefix` as the dummy prefix.
"""
from __future__ import annotations

from pathlib import Path

# GGUF token types and SentencePiece piece types share their numbers:
# 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
_TYPES = {1, 2, 3, 4, 5, 6}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unknown_id(gguf_path, reader, tokens: list, types: list) -> int:
    """SentencePiece cannot load a model without an unknown piece: the GGUF's own id, else the
    piece typed unknown, else "<unk>"; a vocabulary with none is refused by name."""
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    if unk is not None and 0 <= int(unk) < len(tokens):
        return int(unk)
    typed = [i for i, t in enumerate(types) if int(t) == 2]
    if typed:
        return typed[0]
    if "<unk>" in tokens:
        return tokens.index("<unk>")
    raise ValueError(f"{gguf_path}: the vocabulary has no unknown token (no tokenizer.ggml.unknown_token_id, no "
                     "piece typed unknown, no <unk>), and a SentencePiece model needs one")


def spm_model_from_gguf(gguf_path: str | Path) -> bytes | None:
    """The serialized ModelProto for `gguf_path`'s vocabulary, or None when the GGUF's tokenizer
    is not SentencePiece-style (a BPE `gpt2` vocabulary lives in tokenizer.json as it is)."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = GGUFReader(str(gguf_path))
    if _field(reader, "tokenizer.ggml.model") != "llama":
        return None
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)):
        raise ValueError(f"{gguf_path}: tokens, scores and token types differ in length "
                         f"({len(tokens)}, {len(scores)}, {len(types)})")
    unk = _unknown_id(gguf_path, reader, tokens, types)
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        p = proto.pieces.add()
        p.type = 2 if i == unk else (int(kind) if int(kind) in _TYPES and int(kind) != 2 else 1)
        # SentencePiece matches user-defined pieces in the escaped text, where a space is "▁"
        # (the GGUF keeps Gemma's whitespace-run pieces with plain spaces).
        p.piece, p.score = (piece.replace(" ", "\u2581") if p.type == 4 else piece), float(score)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(int(t) == 6 for t in types)
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        i = unk if name == "unk" else int(_field(reader, f"tokenizer.ggml.{key}", -1))
        setattr(spec, f"{name}_id", i if 0 <= i < len(tokens) else -1)
        if 0 <= i < len(tokens):  # sentencepiece finds these by their piece, not their id
            setattr(spec, f"{name}_piece", proto.pieces[i].piece)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()
