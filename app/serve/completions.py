"""/v1/completions: a raw prompt (text or token ids, no chat template), `echo`, `logprobs`.

What lm-evaluation-harness's `local-completions` sends for a loglikelihood is
`{"prompt": ..., "max_tokens": 1, "logprobs": 1, "echo": true, "temperature": 0}` and it reads
`logprobs.token_logprobs` of the prompt's tokens (also `max_tokens: 0`, scoring only). The
logprob of every prompt token needs the logits of every prompt position, which the chat
engine's context does not keep; they come from a scorer with a llama.cpp context of its own
(finetune.evaluate.llama_scorer.GGUFScorer, made by the command for each model on first use
and kept with the model; see ServeOptions.scorer). Generated tokens are scored the same way,
from the generated text tokenized again (the canonical tokens of that text).

Logprob i is log_softmax(logits at position i-1)[token i], natural log; the first token has
none (None, as OpenAI writes it).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from .chat import FINISH, sampling_for
from .errors import ApiError


@dataclass
class TextPiece:
    index: int
    text: str


@dataclass
class ChoiceDone:
    index: int
    choice: dict
    result: object  # engine.Result, or None when nothing was generated
    prompt_tokens: int
    finish_reason: str


class CompletionPlan:
    def __init__(self, req, settings, scorer_factory=None):
        self.req = req
        self.settings = settings
        self.scorer_factory = scorer_factory
        p = req.prompt
        if isinstance(p, str):
            self.prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            self.prompts = [list(p)]
        else:
            self.prompts = list(p)
        if not self.prompts:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        if len(self.prompts) > 64:
            raise ApiError(400, f"prompt: at most 64 prompts per request, got {len(self.prompts)}", "prompt")
        if req.logprobs is not None and req.stream:
            raise ApiError(400, "logprobs: not supported with stream; ask without streaming", "logprobs")
        if req.logprobs is not None and scorer_factory is None:
            raise ApiError(400, "logprobs: not available on this server (no scorer)", "logprobs")
        if req.suffix:
            raise ApiError(400, "suffix: not supported", "suffix")
        self.sampling = sampling_for(req, settings)

    def events(self, engine, cancel, slot):
        if getattr(engine, "llm", None) is None:  # a remote model: no tokenizer or logits here
            raise ApiError(400, f"model {self.req.model!r} is a remote model: raw prompts need a local GGUF; "
                           "use /v1/chat/completions", "model")
        for i, prompt in enumerate(self.prompts):
            if cancel.is_set():
                return
            yield from self._one(engine, cancel, slot, i, prompt)

    def _tokens(self, engine, i: int, prompt) -> list[int]:
        if isinstance(prompt, str):
            tokens = engine.tokenize(prompt)
        else:
            n_vocab = engine.llm.n_vocab()
            bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < n_vocab]
            if bad:
                raise ApiError(400, f"prompt.{i}: token id {bad[0]!r} is outside 0..{n_vocab - 1}", "prompt")
            tokens = list(prompt)
        if not tokens:
            raise ApiError(400, f"prompt.{i}: has no tokens", "prompt")
        room = engine.n_ctx - (self.req.max_tokens if self.req.max_tokens else 0)
        if len(tokens) >= engine.n_ctx or (self.req.logprobs is not None and len(tokens) > room):
            raise ApiError(400, f"prompt.{i}: {len(tokens)} tokens plus max_tokens {self.req.max_tokens} do not fit the "
                           f"context window of {engine.n_ctx} tokens", "prompt", "context_length_exceeded")
        return tokens

    def _one(self, engine, cancel, slot, i: int, prompt):
        req = self.req
        tokens = self._tokens(engine, i, prompt)
        text, result, finish = "", None, "length"
        if req.max_tokens > 0:
            sampling = self.sampling
            for ev in engine.stream(tokens, sampling, cancel):
                if ev.text:
                    text += ev.text
                    yield TextPiece(i, ev.text)
                if ev.done is not None:
                    result = ev.done
            finish = result.finish_reason
        prompt_text = prompt if isinstance(prompt, str) else engine.llm.detokenize(tokens).decode("utf-8", errors="replace")
        out_text = (prompt_text + text) if req.echo else text
        logprobs = None
        if req.logprobs is not None and finish != "cancelled":
            generated = engine.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []
            scorer = _scorer(slot, engine, self.scorer_factory)
            logprobs = score(scorer, engine, tokens, generated, req.logprobs, echo=req.echo)
        choice = {"text": out_text, "index": i, "logprobs": logprobs, "finish_reason": FINISH.get(finish, "stop")}
        yield ChoiceDone(i, choice, result, len(tokens), finish)


def _scorer(slot, engine, factory):
    """The slot's scorer, made on first use (on the job thread, under the model's gate)."""
    if slot.scorer is None:
        slot.scorer = factory(engine.path, engine.n_ctx)
    return slot.scorer


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """rows: (n, n_vocab) raw logits -> natural-log probabilities, in float64."""
    rows = rows.astype(np.float64)
    m = rows.max(axis=1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(axis=1, keepdims=True))


def score(scorer, engine, prompt: list[int], generated: list[int], top: int, echo: bool) -> dict:
    """OpenAI `logprobs` of the prompt's tokens (when echoed) and the generated ones."""
    tokens = prompt + generated
    first = 0 if echo else len(prompt)
    lps: list = []
    tops: list = []
    if len(tokens) > 1:
        rows = log_softmax(scorer.predict(tokens, 1))  # row j predicts tokens[j + 1]
    else:
        rows = np.zeros((0, 1))
    pieces = [engine.llm.detokenize([t]).decode("utf-8", errors="replace") for t in tokens]
    for i in range(first, len(tokens)):
        if i == 0:
            lps.append(None)
            tops.append(None)
            continue
        row = rows[i - 1]
        lps.append(float(row[tokens[i]]))
        if top > 0:
            best = np.argpartition(-row, top - 1)[:top]
            best = best[np.argsort(-row[best])]
            entry = {}
            for t in best:
                entry.setdefault(engine.llm.detokenize([int(t)]).decode("utf-8", errors="replace"), float(row[t]))
            tops.append(entry)
        else:
            tops.append(None)
    offsets, at = [], 0
    for i, p in enumerate(pieces):
        if i >= first:
            offsets.append(at)
        at += len(p)
    return {"tokens": pieces[first:], "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def body(dones: list[ChoiceDone], model: str, cid: str) -> dict:
    choices = [d.choice for d in sorted(dones, key=lambda d: d.index)]
    prompt = sum(d.prompt_tokens for d in dones)
    completion = sum(d.result.completion_tokens for d in dones if d.result is not None)
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def chunk(model: str, cid: str, index: int, text: str, finish: str | None = None) -> str:
    return json.dumps({"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
                       "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]},
                      ensure_ascii=False)
