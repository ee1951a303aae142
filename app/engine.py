"""The inference engine: one worker thread over one `llama_cpp.Llama`.

llama.cpp contexts are not thread-safe, so every call that touches the context
(evaluation, sampling, the KV cache) runs on the engine's own worker thread;
callers get a stream of events through a queue. Tokenizing only reads the
immutable vocabulary and may run on any thread.

Prefix reuse: `Llama.generate` keeps the KV cache of the previous call and
evaluates only the tokens after the longest common prefix, so a follow-up chat
turn costs its new tokens (plus the few template tokens that close the previous
reply), not the whole history. `Event.done.prompt_tokens_evaluated` reports it.

    >>> eng = Engine.load(Registry().get("smollm2-135m"))              # doctest: +SKIP
    >>> for ev in eng.stream(eng.tokenize_chat(msgs), Sampling(temperature=0)):
    ...     print(ev.text, end="")                                      # doctest: +SKIP
"""
from __future__ import annotations

import codecs
import ctypes
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from models.gguf_check import GGUFError, check_adapter, check_gguf
from models.registry import ModelEntry

from .logprobs import LogprobReader
from .probe import ProbeError, ensure_probed
from .template import ChatTemplate


class EngineError(RuntimeError):
    """Loading or running the model failed; the message is for the user."""


@dataclass
class Sampling:
    """Sampling settings of one generation (see Settings for what each does)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int = -1
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    # OpenAI's penalties (serve's API): subtracted from the logits of tokens already in the context,
    # once (presence) or once per occurrence (frequency). 0: none; the chat's settings never set them.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    grammar: object = None  # a llama_cpp.LlamaGrammar that constrains the output (tool calls)
    # The JSON schema `grammar` was built from, when it was (the tool loop's steps): a remote
    # engine sends it as response_format json_schema, which servers without GBNF understand.
    json_schema: dict | None = None
    logprobs: int | None = None  # None: off; N: each token's logprob and N alternatives (app/logprobs.py)

    @classmethod
    def from_settings(cls, settings, stop: list[str] | tuple = ()) -> "Sampling":
        """The sampling fields of a `config.Settings` (plus stop sequences)."""
        names = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "max_tokens")
        return cls(**{n: getattr(settings, n) for n in names}, stop=list(stop))


@dataclass
class Result:
    """How a generation ended, with usage and timings (the `ask --json` fields)."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop sequence), "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_evaluated: int
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    logprobs: list | None = None  # logprobs.TokenLogprob per generated token, when Sampling asked


@dataclass
class Event:
    """One item of a stream: a piece of text, or the final `done` result."""

    text: str = ""
    done: Result | None = None


@dataclass
class LoadOptions:
    """How to load a model. 0/-1 mean automatic, as in Settings."""

    n_ctx: int = 4096
    threads: int = 0
    gpu_layers: int = -1
    seed: int = -1
    lora: Path | None = None  # a GGUF LoRA adapter (crofter convert-lora) applied at scale 1, not merged

    @classmethod
    def from_settings(cls, settings) -> "LoadOptions":
        return cls(settings.n_ctx, settings.threads, settings.gpu_layers, settings.seed)


def auto_threads() -> int:
    """CPU threads to use: the CPUs this process may run on (llama-cpp-python's own
    default, half of cpu_count, leaves a 2-core machine on one thread)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def auto_gpu_layers(requested: int) -> int:
    """-1 means: every layer on the GPU when this llama.cpp build can offload, else none."""
    import llama_cpp

    if requested >= 0:
        return requested
    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


_STOP = object()  # sentinel that ends the worker


class Engine:
    """A loaded model and the one thread allowed to run it."""

    def __init__(self, llm, path: Path, template: ChatTemplate, gpu_layers: int, threads: int):
        import llama_cpp

        self.llm = llm
        self.path = path
        self.template = template
        self.gpu_layers = gpu_layers
        self.threads = threads
        self.n_ctx = llm.n_ctx()
        self._vocab = llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._to_piece = llama_cpp.llama_token_to_piece
        self._piece_buf = ctypes.create_string_buffer(64)
        self._grammars_ok: set[str] = set()  # grammar texts llama.cpp has parsed
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name=f"crofter-engine:{path.name}", daemon=True)
        self._worker.start()

    # -- loading -----------------------------------------------------------
    @classmethod
    def load(cls, entry: ModelEntry, options: LoadOptions | None = None) -> "Engine":
        """Validate the GGUF, test-load it in a child process the first time, then load it."""
        options = options or LoadOptions()
        if entry.kind != "gguf":
            raise EngineError(f"{entry.name}: an HF checkpoint cannot be chatted with directly; run `crofter convert` first")
        summary = check_gguf(entry.file)  # a malformed file (model or adapter) never reaches llama.cpp
        try:
            lora = str(check_adapter(options.lora, summary).path) if options.lora else None
        except GGUFError as exc:
            raise EngineError(str(exc)) from None
        try:  # nor, in this process, one that crashed (or has not yet loaded) in a child
            ensure_probed(entry)
        except ProbeError as exc:
            raise EngineError(str(exc)) from None
        from llama_cpp import Llama

        arch = summary.metadata.get("general.architecture", "")
        trained = summary.metadata.get(f"{arch}.context_length") or 4096
        n_ctx = options.n_ctx or min(int(trained), 8192)
        threads = options.threads or auto_threads()
        gpu_layers = auto_gpu_layers(options.gpu_layers)
        try:
            llm = Llama(
                model_path=str(entry.file),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=gpu_layers,
                lora_path=lora,
                seed=options.seed if options.seed >= 0 else random.randrange(2**31),
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"{entry.file}: llama.cpp could not load the model ({exc})") from None
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        template = ChatTemplate.from_metadata(llm.metadata, bos=bos, eos=eos)
        return cls(llm, entry.file, template, gpu_layers, threads)

    def reset(self) -> None:
        """Forget the KV cache: the next generation evaluates its whole prompt (on the worker, after
        any generation in flight). To compare runs: a cached prefix can flip a greedy tie."""
        self.call(self.llm.reset)

    def call(self, fn):
        """fn() on the worker thread (llama.cpp is not thread-safe), after any generation in flight."""
        box: dict = {}
        done = threading.Event()

        def job():
            try:
                box["value"] = fn()
            except BaseException as exc:  # the worker must survive; the caller gets the error
                box["error"] = exc

        self._jobs.put((job, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        """Stop the worker and free the model."""
        self._jobs.put(_STOP)
        self._worker.join(timeout=30)
        self.llm.close()

    # -- tokens ------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text` with the model's own tokenizer (BOS added if the model wants it)."""
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)
        bos = self.llm.token_bos()
        # A template that writes {{ bos_token }} plus llama.cpp's own BOS would give
        # two; models degrade with a doubled BOS (llama-cpp-python #1501).
        if len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]
        return tokens

    def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of `messages` rendered with the chat template, ready for `stream`."""
        return self.tokenize(self.template.render(messages, tools))

    # -- generation --------------------------------------------------------
    def stream(self, prompt_tokens: list[int], sampling: Sampling, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Generate from `prompt_tokens` on the worker; yields text events, then one `done`.

        Closing the iterator early (or setting `cancel`) stops the generation at the
        next token; the partial result then has finish_reason "cancelled".
        """
        if len(prompt_tokens) >= self.n_ctx:
            raise EngineError(f"the prompt is {len(prompt_tokens)} tokens but the context window is {self.n_ctx}")
        if sampling.grammar is not None:
            self.check_grammar(sampling.grammar)
        cancel = cancel or threading.Event()
        out: queue.Queue = queue.Queue()
        self._jobs.put((list(prompt_tokens), sampling, cancel, out))
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {item}") from item
                yield item
                if item.done is not None:
                    return
        finally:
            cancel.set()

    def check_grammar(self, grammar) -> None:
        """Refuse a GBNF grammar llama.cpp cannot parse (generating with one crashes the process;
        llama-cpp-python's LlamaGrammar does not parse it). llama.cpp prints the parse error."""
        import llama_cpp

        text = grammar._grammar
        if text in self._grammars_ok:
            return
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode("utf-8"), grammar._root.encode("utf-8"))
        if not sampler:
            raise EngineError("the grammar does not parse (llama.cpp printed why above)")
        llama_cpp.llama_sampler_free(sampler)
        self._grammars_ok.add(text)

    def complete(self, prompt_tokens: list[int], sampling: Sampling) -> Result:
        """Generate without streaming; the same text `stream` would give."""
        for ev in self.stream(prompt_tokens, sampling):
            if ev.done is not None:
                return ev.done
        raise EngineError("generation ended without a result")  # pragma: no cover

    # -- worker side ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if len(job) == 2:  # (callable, event): maintenance on the worker thread
                fn, finished = job
                try:
                    fn()
                finally:
                    finished.set()
                continue
            tokens, sampling, cancel, out = job
            try:
                self._generate(tokens, sampling, cancel, out)
            except BaseException as exc:  # handed to the caller's thread
                out.put(exc)

    def _piece(self, token: int) -> bytes:
        """The bytes of one token (growing the buffer for long pieces, which
        llama-cpp-python's own detokenize asserts on)."""
        n = self._to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self._to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    def _reused_prefix(self, tokens: list[int]) -> int:
        """How many prompt tokens Llama.generate will take from the KV cache (its own rule)."""
        llm = self.llm
        if llm.n_tokens == 0:
            return 0
        lcp = llm.longest_token_prefix(llm._input_ids.tolist(), tokens)
        if lcp == len(tokens):
            if llm.n_tokens == len(tokens) and not llm._requires_eval:
                return len(tokens)
            return lcp - 1
        return lcp

    def _generate(self, tokens: list[int], s: Sampling, cancel: threading.Event, out: queue.Queue) -> None:
        llm = self.llm
        t0 = time.perf_counter()
        evaluated = len(tokens) - self._reused_prefix(tokens)
        llm.set_seed(s.seed if s.seed >= 0 else random.randrange(2**31))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = [x for x in s.stop if x]
        longest_stop = max((len(x) for x in stops), default=0)
        text, emitted = "", 0
        n_out, n_seen, t_first, t_last = 0, 0, None, t0
        finish = "length"
        budget = min(s.max_tokens, self.n_ctx - len(tokens))
        lp = LogprobReader(llm, s.logprobs, self._piece) if s.logprobs is not None else None
        gen = llm.generate(
            tokens,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            temp=s.temperature,
            repeat_penalty=s.repeat_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            grammar=s.grammar,
        )
        try:
            for tok in gen:
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                t_last = now
                n_seen += 1
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if self._is_eog(self._vocab, tok):
                    finish = "stop"
                    break
                n_out += 1
                if lp is not None:
                    lp.add(tok)
                text += decoder.decode(self._piece(tok))
                hit = -1
                if stops:
                    window = max(0, emitted - longest_stop)
                    hits = [i for i in (text.find(x, window) for x in stops) if i >= 0]
                    hit = min(hits) if hits else -1
                if hit >= 0:
                    text = text[:hit]
                    if hit > emitted:
                        out.put(Event(text[emitted:hit]))
                    emitted = len(text)
                    finish = "stop"
                    break
                # Hold back a tail that could still become a stop sequence.
                hold = 0
                for x in stops:
                    for k in range(min(len(x) - 1, len(text) - emitted), 0, -1):
                        if text.endswith(x[:k]):
                            hold = max(hold, k)
                            break
                if len(text) - hold > emitted:
                    out.put(Event(text[emitted : len(text) - hold]))
                    emitted = len(text) - hold
                if n_out >= budget:
                    break
        finally:
            gen.close()
        text += decoder.decode(b"", final=True)
        if len(text) > emitted:  # what was held back for a stop sequence that never came
            out.put(Event(text[emitted:]))
        end = time.perf_counter()
        first = t_first if t_first is not None else end
        decode_s = t_last - first
        out.put(Event(done=Result(
            text=text, finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=n_out,
            prompt_tokens_evaluated=evaluated, ttft_s=first - t0,
            decode_tokens_per_s=(n_seen - 1) / decode_s if n_seen > 1 and decode_s > 0 else 0.0,
            total_s=end - t0, logprobs=lp.items if lp is not None else None)))
