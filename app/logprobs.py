"""Per-token log-probabilities of a generation, read from llama.cpp's logits as each token is
sampled (`Sampling.logprobs`: None off, N the number of alternatives kept per token).

When `Llama.generate` yields a token, the context still holds the logits it was sampled from
(the row of the last evaluated position); `LogprobReader.add` reads that row, so the figures
cost one log-softmax per token and no second pass. They are the model's own distribution:
natural log, before temperature, top-k/p or a grammar shape the choice (a token a grammar
forced can have a low logprob). `Result.logprobs` holds one `TokenLogprob` per generated
token, end-of-generation tokens excluded.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field

MAX_TOP = 20  # OpenAI's bound on top_logprobs


@dataclass
class TokenLogprob:
    token: bytes  # the token's bytes (a piece may hold part of a UTF-8 character)
    logprob: float
    top: list[tuple[bytes, float]] = field(default_factory=list)  # the most likely tokens, best first


class LogprobReader:
    """Collects a `TokenLogprob` for each token of one generation (on the engine's thread)."""

    def __init__(self, llm, top: int, piece):
        import llama_cpp

        if not 0 <= top <= MAX_TOP:
            raise ValueError(f"logprobs: keep 0..{MAX_TOP} alternatives per token, not {top}")
        self._logits = llama_cpp.llama_get_logits_ith
        self._ctx = llm._ctx.ctx
        self._n_vocab = llm.n_vocab()
        self._top = top
        self._piece = piece  # token id -> bytes
        self.items: list[TokenLogprob] = []

    def add(self, token: int) -> None:
        import numpy as np

        row = np.ctypeslib.as_array(self._logits(self._ctx, -1), shape=(self._n_vocab,)).astype(np.float64)
        m = row.max()
        row -= m + np.log(np.exp(row - m).sum())
        top: list[tuple[bytes, float]] = []
        if self._top:
            best = np.argpartition(-row, self._top - 1)[: self._top]
            top = [(self._piece(int(t)), float(row[t])) for t in best[np.argsort(-row[best])]]
        self.items.append(TokenLogprob(self._piece(token), float(row[token]), top))


def within(items: list[TokenLogprob], start: int, end: int) -> list[TokenLogprob]:
    """The tokens whose text reaches into characters [start, end) of the decoded generation and
    begins before `end`: the answer's tokens, leaving out a reasoning trace before it or a stop
    sequence cut after it. A token that straddles `start` (" Yes" after "</think>", whose
    space the split dropped) is the answer's; one with no character yet (the first bytes of a
    split UTF-8 character) goes with the characters that follow it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as the engine decodes
    out, at = [], 0
    for item in items:
        n = len(decoder.decode(item.token))
        if at < end and (at + n > start or (n == 0 and at >= start)):
            out.append(item)
        at += n
    return out
