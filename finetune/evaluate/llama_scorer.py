"""A GGUF model in llama.cpp as a scorer: logits only where they are scored, the KV
cache kept between calls, and the endings of one context decoded together.

Sequence 0 of the scorer's own llama.cpp context holds the last sequence scored; a
sequence that starts with the same tokens (the four endings of one HellaSwag item,
the few-shot examples every item shares) evaluates only its new tokens. The endings
of one context are sequences 1..N that share the context's cells in a unified KV
cache, and several items go into one batch (`predict_items`): a 4-choice item costs
its context once, and one decode of ~256 tokens carries several items.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .rows import EvalError
from .scorer import threads

SEQUENCES = 64  # sequence 0 plus up to 63 endings (of one item or several) in one decode
# Items packed per decode up to this many tokens: bigger batches run faster per token, but every
# token attends over all the pack's cells, so past ~256 the attention eats the gain (bench_eval:
# median ratio 2.15x packing to 512, 2.70x to 256, 2.61x to 160, 2.47x to 96; 2.22x unpacked).
PACK_TOKENS = 256


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class GGUFScorer:
    kind = "gguf"

    def __init__(self, path: str | Path, n_ctx: int = 2048, gpu_layers: int = 0, lora: str | Path | None = None,
                 reuse_prefix: bool = True, n_threads: int | None = None, kv_f32: bool = False):
        from llama_cpp import Llama
        from llama_cpp import _internals
        from llama_cpp import llama_cpp as C

        self.path = Path(path)
        t = n_threads or threads()
        try:
            # The Llama object supplies the model, vocabulary and LoRA adapter; scoring runs in
            # a context of its own with several sequences (Llama's has one).
            self.llm = Llama(model_path=str(self.path), n_ctx=64, n_batch=64, n_threads=t, n_threads_batch=t,
                             n_gpu_layers=gpu_layers, lora_path=str(lora) if lora else None, seed=0, verbose=False)
        except ValueError as e:
            raise EvalError(f"{self.path}: llama.cpp could not load it ({e})") from None
        self.n_batch = min(n_ctx, 512)
        # Llama's own settings (flash attention off, as in the chat: its CPU kernel rounds Q to
        # F16), with room for several sequences.
        cp = C.llama_context_params.from_buffer_copy(self.llm.context_params)
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, self.n_batch, self.n_batch
        # llama.cpp aborts a decode (n_outputs_max) when a context has more sequences than batch rows.
        self.n_seq = min(SEQUENCES, self.n_batch)
        cp.n_seq_max, cp.kv_unified = self.n_seq, True
        cp.n_threads = cp.n_threads_batch = t
        if kv_f32:
            # An F16 KV cache rounds every key and value: ~5e-3 on a token's log-probability,
            # more than the checkpoint-vs-GGUF comparison should carry. F32 costs memory only.
            cp.type_k = cp.type_v = 0
        try:
            self.ctx = _internals.LlamaContext(model=self.llm._model, params=cp, verbose=False)
        except ValueError as e:
            self.llm.close()
            raise EvalError(f"{self.path}: llama.cpp could not make a {n_ctx}-token context ({e})") from None
        if self.llm._lora_adapter is not None:
            adapters = (C.llama_adapter_lora_p_ctypes * 1)(self.llm._lora_adapter)
            if C.llama_set_adapters_lora(self.ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
                raise EvalError(f"{lora}: llama.cpp could not apply the adapter")
        self.batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=self.n_seq, verbose=False)
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        self.reuse_prefix = reuse_prefix
        self._tokens: list[int] = []            # what sequence 0 holds
        self._rows: dict[int, np.ndarray] = {}  # sequence 0's logits kept by position, for reuse
        self.decoded = 0                        # tokens actually evaluated (reuse shows here)
        self.decodes = 0                        # llama_decode calls (packing shows here)

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        """The token llama.cpp puts first in a sequence for this model, if any."""
        return self.llm.token_bos() if self.llm._model.add_bos_token() else None

    @property
    def eos_id(self) -> int:
        return self.llm.token_eos()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    # -- scoring --------------------------------------------------------------------------------
    def forget(self) -> None:
        """Drop the kept KV cache."""
        self.ctx.kv_cache_seq_rm(-1, 0, -1)
        self._tokens, self._rows = [], {}

    def predict(self, tokens: list[int], start: int) -> np.ndarray:
        """Raw logits predicting tokens[start:], shape (len(tokens) - start, n_vocab).

        Row i comes from position start - 1 + i; the last token itself is never
        evaluated (nothing after it is scored)."""
        n = len(tokens)
        if not 1 <= start <= n:
            raise ValueError(f"start {start} outside 1..{n}")
        if n > self.n_ctx + 1:
            raise ValueError(f"{n} tokens do not fit a context of {self.n_ctx}")
        body = tokens[:n - 1]
        need = range(start - 1, n - 1)
        keep = _common_prefix(body, self._tokens) if self.reuse_prefix else 0
        for j in need:  # a needed row that was never computed forces its position to be evaluated
            if j < keep and j not in self._rows:
                keep = j
                break
        self.ctx.kv_cache_seq_rm(-1, keep, -1)
        self._tokens = self._tokens[:keep]
        self._rows = {j: r for j, r in self._rows.items() if start - 1 <= j < keep}
        new = body[keep:]
        for i in range(0, len(new), self.n_batch):
            piece = new[i:i + self.n_batch]
            pos0 = keep + i
            out = self._decode([((0,), pos0, piece, start - 1)])
            for k, row in out:
                self._rows[pos0 + k] = row
            self._tokens.extend(piece)
        return np.stack([self._rows[j] for j in need]) if len(need) else np.zeros((0, self.n_vocab), np.float32)

    def predict_items(self, items: list[tuple[list[int], list[list[int]]]]) -> list[list[np.ndarray]]:
        """For every (context, endings) item, predict(context + e, len(context)) for each ending
        e; several items packed into one decode.

        The contexts' common prefix goes to sequence 0 (reused from the last call when it
        matches); the rest of each context is decoded once with the sequence ids of all its
        endings, and each ending as a sequence of its own, all in one batch of up to PACK_TOKENS
        (an item bigger than that goes alone, up to n_batch)."""
        if self.n_seq < 2:  # a context of one token: nothing to pack
            return [[self.predict(ctx + e, len(ctx)) for e in ends] for ctx, ends in items]
        results: list[list] = [[None] * len(ends) for _, ends in items]
        todo: list[tuple[int, list[int], list[int]]] = []  # (item, context, ending indexes)
        for n, (ctx, ends) in enumerate(items):
            ok = [i for i, e in enumerate(ends) if ctx and e and len(ctx) + len(e) <= self.n_ctx + 1
                  and len(e) <= self.n_batch]
            for i in sorted(set(range(len(ends))) - set(ok)):  # empty or too long: on its own, batch by batch
                results[n][i] = self.predict(ctx + ends[i], len(ctx)) if ends[i] else np.zeros((0, self.n_vocab))
            for at in range(0, len(ok), self.n_seq - 1):
                todo.append((n, ctx, ok[at:at + self.n_seq - 1]))
        while todo:
            pack, shared = self._pack(todo, items)
            del todo[:len(pack)]
            self._decode_pack(pack, shared, items, results)
        return results

    def _cost(self, pack, items, shared: int) -> tuple[int, int]:
        """(tokens in the batch, KV cells) for `pack` with the first `shared` tokens in sequence 0."""
        toks = sum(len(ctx) - shared + sum(len(items[n][1][i]) - 1 for i in idx) for n, ctx, idx in pack)
        return toks, shared + toks

    def _pack(self, todo, items):
        """The longest run from the head of `todo` that fits one batch, the cache and the
        sequences, and the prefix its contexts share (one token short of the shortest)."""
        pack, shared, seqs = [todo[0]], len(todo[0][1]) - 1, len(todo[0][2])
        for entry in todo[1:]:
            ctx = entry[1]
            s = min(shared, _common_prefix(pack[0][1], ctx), len(ctx) - 1)
            toks, cells = self._cost([*pack, entry], items, s)
            if seqs + len(entry[2]) > self.n_seq - 1 or toks > PACK_TOKENS or cells > self.n_ctx:
                break
            pack.append(entry)
            shared, seqs = s, seqs + len(entry[2])
        return pack, shared

    def _decode_pack(self, pack, shared: int, items, results) -> None:
        toks, cells = self._cost(pack, items, shared)
        if toks > self.n_batch or cells > self.n_ctx:  # one item too big to decode at once: one by one
            for n, ctx, idx in pack:
                for i in idx:
                    results[n][i] = self.predict(ctx + items[n][1][i], len(ctx))
            return
        if shared:
            self.predict(pack[0][1][:shared] + [0], shared)  # sequence 0 holds the shared prefix
        else:
            self.ctx.kv_cache_seq_rm(-1, 0, -1)
            self._tokens, self._rows = [], {}
        parts, seq = [], 1
        for n, ctx, idx in pack:
            ids = tuple(range(seq, seq + len(idx)))
            if shared:
                for s in ids:
                    self.ctx.kv_cache_seq_cp(0, s, 0, shared)
            parts.append((ids, shared, ctx[shared:], len(ctx) - 1))
            for s, i in zip(ids, idx):
                parts.append(((s,), len(ctx), items[n][1][i][:-1], len(ctx)))
            seq += len(idx)
        rows = self._decode(parts)
        at = 0
        for n, ctx, idx in pack:
            head = rows[at][1]
            at += 1
            for i in idx:
                m = len(items[n][1][i]) - 1
                results[n][i] = np.vstack([head[None, :], *[r[None, :] for _, r in rows[at:at + m]]])
                at += m
        for s in range(1, seq):
            self.ctx.kv_cache_seq_rm(s, -1, -1)

    def _decode(self, parts: list[tuple[tuple[int, ...], int, list[int], int]]) -> list[tuple[int, np.ndarray]]:
        """One llama_decode of several (seq_ids, first position, tokens, logits-from position)
        parts; returns (index within the part, logits row) for every token with logits."""
        total = sum(len(toks) for _, _, toks, _ in parts)
        if total > self.n_batch:
            raise ValueError(f"batch of {total} tokens over n_batch {self.n_batch}")
        b = self.batch.batch
        n, wanted = 0, []
        for seqs, pos0, toks, want_from in parts:
            for k, tok in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, pos0 + k, len(seqs)
                for j, seq in enumerate(seqs):
                    b.seq_id[n][j] = seq
                b.logits[n] = pos0 + k >= want_from
                if b.logits[n]:
                    wanted.append(k)
                n += 1
        if not wanted:  # llama.cpp wants one output at least; it is simply not kept
            b.logits[n - 1] = True
        b.n_tokens = n
        self.ctx.decode(self.batch)
        self.decoded += n
        self.decodes += 1
        if not wanted:
            return []
        out = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(len(wanted) * self.n_vocab,))
        out = out.reshape(len(wanted), self.n_vocab)
        return [(k, out[r].copy()) for r, k in enumerate(wanted)]

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompt: list[int], max_tokens: int, stop: list[str] = ()) -> str:
        """Greedy continuation (argmax every step, nothing else changes the logits), cut at
        the first stop string or end-of-generation token."""
        seq = prompt[-max(1, self.n_ctx - max_tokens - 1):]
        out: list[int] = []
        row = self.predict(seq + [0], len(seq))[-1]
        text = ""
        for _ in range(max_tokens):
            tok = int(np.argmax(row))
            if self._is_eog(tok):
                break
            out.append(tok)
            text = self.detokenize(out)
            hits = [text.find(s) for s in stop if s and s in text]
            if hits:
                return text[:min(hits)]
            seq.append(tok)
            row = self.predict(seq + [0], len(seq))[-1]
        return text

    def _is_eog(self, tok: int) -> bool:
        from llama_cpp import llama_cpp as C

        return bool(C.llama_vocab_is_eog(self.llm._model.vocab, tok))

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.llm.close()
