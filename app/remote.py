"""A model behind an OpenAI-compatible server (vLLM, llama-server, Ollama, another `crofter
serve`), with the engine's interface as the turn uses it.

    $ crofter models add-remote big --base-url http://gpu-box:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    >>> eng = RemoteEngine.connect(Registry().get("big"))                      # doctest: +SKIP
    >>> for ev in eng.stream(eng.tokenize_chat(msgs), Sampling(temperature=0)):
    ...     print(ev.text, end="")                                              # doctest: +SKIP

The seam: the turn, the tool loop and the context budget hand `stream` whatever `tokenize_chat`
returned. A local engine returns token ids; a remote has no tokenizer here, so it returns a
`RemotePrompt`: the fitted messages themselves, whose `len` is an estimate of their tokens
(characters / 3.5 plus a few per message for the template's markup), which is all the budget
(budget.fit_messages) and the context meter read. The server renders its own chat template;
each reply's `usage.prompt_tokens` is the true count, and lowers the characters-per-token
ratio when the estimate was short of it (never raises it: a high estimate only leaves room).
The window is the registered `--n-ctx`, else the server's `max_model_len` (vLLM), else 4096.

Grammars: a tool-step grammar built from a JSON schema (Sampling.json_schema) goes out as
`response_format: {"type": "json_schema"}` (vLLM, llama-server, Ollama, crofter serve); any other
GBNF as the `grammar` field (llama-server, crofter serve). A server that ignores both answers
unconstrained, and the tool loop holds such a reply to the same rules as any other.

Errors are one line naming the URL (EngineError): unreachable, key refused (401), unknown model
(404), no answer in time. A stream that breaks after the reply began ends it with what came so
far, finish_reason "error" (the chat history keeps it, marked incomplete); one that breaks
before is an error, and nothing of the reply exists.
"""
from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from typing import Iterator

from models.registry import ModelEntry

from .engine import EngineError, Event, Result, Sampling
from .template import ChatTemplate

CHARS_PER_TOKEN = 3.5  # a deliberately low guess for BPE vocabularies on English text (~4)
TOKENS_PER_MESSAGE = 5  # role markers and separators most chat templates add per message
DEFAULT_N_CTX = 4096
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 300.0  # a long prompt on a busy server can take minutes to its first token
FINISH = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop", "eos": "stop"}


class RemotePrompt:
    """What `RemoteEngine.tokenize_chat` returns: the messages to send, sized by an estimate of
    their tokens (`len`). It holds no token ids; only a RemoteEngine can generate from it."""

    def __init__(self, messages: list[dict], estimate: int):
        self.messages = messages
        self.estimate = estimate

    def __len__(self) -> int:
        return self.estimate

    def __repr__(self) -> str:
        return f"RemotePrompt({len(self.messages)} messages, ~{self.estimate} tokens)"


def api_key(entry: ModelEntry) -> str:
    """The key from the environment variable named at registration ("" without one)."""
    return os.environ.get(entry.api_key_env, "") if entry.api_key_env else ""


def _client(api_key: str, read_timeout: float):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(headers=headers, timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S))


def _error_message(resp) -> str:
    """The server's own error text (OpenAI's shape, FastAPI's, or plain), on one line."""
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message", body)))
        body = err.get("message", err) if isinstance(err, dict) else err
    return " ".join(str(body).split())[:300] or resp.reason_phrase


def _http_error(url: str, resp, key_env: str = "") -> EngineError:
    text = f"{url}: HTTP {resp.status_code}: {_error_message(resp)}"
    if resp.status_code in (401, 403) and key_env and not os.environ.get(key_env):
        text += f" (the API key comes from ${key_env}, which is not set)"
    elif resp.status_code in (401, 403) and not key_env:
        text += " (register the model with --api-key-env VAR to send a key)"
    return EngineError(text)


def _transport_error(url: str, exc: Exception) -> EngineError:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return EngineError(f"cannot reach {url}: {exc or 'connection refused'}; is the server running?")
    if isinstance(exc, httpx.TimeoutException):
        return EngineError(f"{url}: no answer in time ({type(exc).__name__})")
    return EngineError(f"{url}: the connection failed ({type(exc).__name__}: {exc})")


def check_server(base_url: str, key: str = "", model: str = "", key_env: str = "",
                 timeout: float = CONNECT_TIMEOUT_S) -> tuple[str, int]:
    """(the model id to use, the window the server reports or 0) from GET {base_url}/models.
    Without `model`, the server must offer exactly one. Raises EngineError in one line."""
    import httpx

    url = base_url.rstrip("/") + "/models"
    try:
        with _client(key, timeout) as client:
            resp = client.get(url)
    except httpx.HTTPError as exc:
        raise _transport_error(base_url, exc) from None
    if resp.status_code == 404 and not base_url.rstrip("/").endswith("/v1"):
        raise EngineError(f"{url}: HTTP 404; OpenAI-compatible servers answer under /v1 (try --base-url {base_url.rstrip('/')}/v1)")
    if resp.status_code != 200:
        raise _http_error(base_url, resp, key_env)
    try:
        cards = [c for c in resp.json()["data"] if isinstance(c, dict) and "id" in c]
    except (ValueError, KeyError, TypeError):
        raise EngineError(f"{url}: not an OpenAI model list (no 'data' array of models)") from None
    ids = [str(c["id"]) for c in cards]
    if not model:
        # An embedder a server marks as one (crofter serve lists its own) is no chat model.
        chat = [i for i, c in zip(ids, cards) if (c.get("crofter") or {}).get("kind") != "embedding"]
        if len(chat) != 1:
            offered = ", ".join(chat[:10]) or "no models"
            raise EngineError(f"{base_url} offers {offered}: name one with --model")
        model = chat[0]
    elif model not in ids:
        raise EngineError(f"{base_url} has no model {model!r} (it offers: {', '.join(ids[:10]) or 'none'})")
    card = cards[ids.index(model)]
    n_ctx = card.get("max_model_len") or 0  # vLLM reports its window; others do not
    return model, int(n_ctx) if isinstance(n_ctx, int) and n_ctx > 0 else 0


def _render_plain(messages: list[dict], tools=None) -> str:
    """What a remote template might look like, for estimates and logs only: the server renders."""
    return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant: "


class RemoteEngine:
    """An OpenAI-compatible chat endpoint that answers like `engine.Engine`."""

    def __init__(self, base_url: str, model: str, n_ctx: int = DEFAULT_N_CTX, key: str = "", key_env: str = "",
                 read_timeout: float = READ_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.path = self.base_url  # what the UI shows where a local engine shows its file
        self.model = model
        self.n_ctx = n_ctx
        self.key_env = key_env
        self.template = ChatTemplate("remote", None, _render_plain)  # no native tools: listed in the system prompt
        self.chars_per_token = CHARS_PER_TOKEN
        self._client = _client(key, read_timeout)

    @classmethod
    def connect(cls, entry: ModelEntry, read_timeout: float = READ_TIMEOUT_S) -> "RemoteEngine":
        """Check the server (reachable, key accepted, model offered), then the engine for `entry`."""
        key = api_key(entry)
        model, served = check_server(entry.path, key, entry.model, entry.api_key_env)
        return cls(entry.path, model, entry.n_ctx or served or DEFAULT_N_CTX, key, entry.api_key_env, read_timeout)

    def close(self) -> None:
        self._client.close()

    def reset(self) -> None:
        """Nothing to forget here: the server keeps (and reuses) its own cache."""

    def check_grammar(self, grammar) -> None:
        """The server parses grammars; one it refuses comes back as an HTTP 400 error."""

    # -- tokens (estimated) ------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        raise EngineError(f"{self.base_url}: a remote model has no tokenizer here; token ids and raw prompts need a local GGUF")

    def estimate(self, messages: list[dict]) -> int:
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        return math.ceil(chars / self.chars_per_token) + TOKENS_PER_MESSAGE * len(messages) + 1

    def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None) -> RemotePrompt:
        """The messages as the server will get them, sized by the estimate (see the module doc)."""
        msgs = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
        return RemotePrompt(msgs, self.estimate(msgs))

    # -- generation -----------------------------------------------------------------------
    def body(self, prompt: RemotePrompt, s: Sampling) -> dict:
        """The /chat/completions request: OpenAI's fields, plus the sampling extensions that
        llama-server, vLLM and crofter serve read (others ignore them)."""
        body = {"model": self.model, "messages": prompt.messages, "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": s.max_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p,
                "repeat_penalty": s.repeat_penalty, "repetition_penalty": s.repeat_penalty}
        if s.seed >= 0:
            body["seed"] = s.seed
        for k in ("frequency_penalty", "presence_penalty"):
            if getattr(s, k):
                body[k] = getattr(s, k)
        if s.stop:
            body["stop"] = list(s.stop)
        if s.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "crofter_step", "schema": s.json_schema}}
        elif s.grammar is not None:
            body["grammar"] = s.grammar._grammar
        return body

    def stream(self, prompt, sampling: Sampling, cancel: threading.Event | None = None) -> Iterator[Event]:
        """POST the messages with `stream: true`; yields text events, then one `done` (as
        Engine.stream). Setting `cancel` (or closing the iterator) drops the connection, which
        the server takes as a cancel; the partial result has finish_reason "cancelled"."""
        if not isinstance(prompt, RemotePrompt):
            raise EngineError(f"{self.base_url}: a remote model takes messages (tokenize_chat), not token ids")
        if len(prompt) >= self.n_ctx:
            raise EngineError(f"the prompt is about {len(prompt)} tokens but the context window is {self.n_ctx}")
        cancel = cancel or threading.Event()
        items: queue.Queue = queue.Queue()
        held: dict = {}
        # The HTTP read runs on its own thread so that a cancel takes effect while the server is
        # still silent (a long prompt): this side stops waiting and closes the response.
        reader = threading.Thread(target=self._read, args=(self.body(prompt, sampling), cancel, items, held),
                                  name="crofter-remote", daemon=True)
        t0 = time.perf_counter()
        reader.start()
        json_step = sampling.json_schema is not None
        text, n_chunks, t_first, t_last, usage = "", 0, None, t0, None
        finish, thinking = "length", False
        try:
            while True:
                try:
                    kind, value = items.get(timeout=0.05)
                except queue.Empty:
                    kind = value = None
                if cancel.is_set() and kind != "end":
                    finish = "cancelled"
                    break
                if kind is None:
                    continue
                if kind == "usage":
                    usage = value
                    continue
                if kind == "end":
                    finish = FINISH.get(value, "stop") if value else "stop"
                    break
                if kind == "error":
                    if t_first is None:  # nothing of the reply exists: the turn fails, as a whole
                        raise value
                    finish = "error"
                    break
                piece, reasoning = value
                now = time.perf_counter()
                t_first = t_first if t_first is not None else now
                t_last, n_chunks = now, n_chunks + 1
                # A trace the server splits off (vLLM's reasoning parser, crofter serve) goes on as
                # <think> text, which the turn splits again; a JSON step keeps only its object.
                out = ""
                if reasoning and not json_step:
                    out += ("" if thinking else "<think>") + reasoning
                    thinking = True
                if piece:
                    out += ("</think>\n\n" if thinking else "") + piece
                    thinking = False
                if out:
                    text += piece or ""
                    yield Event(out)
        finally:
            cancel.set()
            resp = held.get("response")
            if resp is not None:
                try:
                    resp.close()
                except Exception:  # closing from this thread while the reader reads: best effort
                    pass
        end = time.perf_counter()
        prompt_tokens = int((usage or {}).get("prompt_tokens") or len(prompt))
        completion = int((usage or {}).get("completion_tokens") or n_chunks)
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if usage and usage.get("prompt_tokens"):
            self._learn(prompt, int(usage["prompt_tokens"]))
        first = t_first if t_first is not None else end
        decode_s = t_last - first
        yield Event(done=Result(
            text=text, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=completion,
            prompt_tokens_evaluated=max(0, prompt_tokens - int(cached)), ttft_s=first - t0,
            decode_tokens_per_s=(completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0,
            total_s=end - t0))

    def complete(self, prompt, sampling: Sampling) -> Result:
        """Generate without streaming; the same text `stream` would give."""
        for ev in self.stream(prompt, sampling):
            if ev.done is not None:
                return ev.done
        raise EngineError("generation ended without a result")  # pragma: no cover

    def _learn(self, prompt: RemotePrompt, true_tokens: int) -> None:
        """Lower the characters-per-token ratio when the estimate fell short of the server's count."""
        if true_tokens <= len(prompt):
            return
        chars = sum(len(m["content"]) for m in prompt.messages)
        budget = true_tokens - TOKENS_PER_MESSAGE * len(prompt.messages) - 1
        if chars and budget > 0:
            self.chars_per_token = max(1.0, min(self.chars_per_token, 0.95 * chars / budget))

    def _read(self, body: dict, cancel: threading.Event, items: queue.Queue, held: dict) -> None:
        """The reader thread: SSE lines in, ("text", (content, reasoning)) / ("usage", dict) /
        ("end", finish_reason) / ("error", EngineError) out."""
        import httpx

        url = self.base_url + "/chat/completions"
        finish = None
        try:
            with self._client.stream("POST", url, json=body) as resp:
                held["response"] = resp
                if resp.status_code != 200:
                    resp.read()
                    items.put(("error", _http_error(self.base_url, resp, self.key_env)))
                    return
                for line in resp.iter_lines():
                    if cancel.is_set():
                        return
                    if not line.startswith("data:"):
                        continue  # comments, pings, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        items.put(("end", finish))
                        return
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        items.put(("error", EngineError(f"{self.base_url}: the stream sent something not JSON")))
                        return
                    if "error" in chunk:  # an error after the 200 (crofter serve, vLLM)
                        err = chunk["error"]
                        message = err.get("message", err) if isinstance(err, dict) else err
                        items.put(("error", EngineError(f"{self.base_url}: the server failed mid-reply: {message}")))
                        return
                    if chunk.get("usage"):
                        items.put(("usage", chunk["usage"]))
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        piece = delta.get("content") or ""
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                        if piece or reasoning:
                            items.put(("text", (piece, reasoning)))
                        finish = choice.get("finish_reason") or finish
            # The body ended without [DONE]: a server that does not send it ended cleanly only
            # if it said how the reply finished.
            items.put(("end", finish) if finish else ("error", EngineError(f"{self.base_url}: the stream ended early")))
        except httpx.HTTPError as exc:
            items.put(("error", _transport_error(self.base_url, exc)))
        except Exception as exc:  # the caller's thread reports it; a reader must not die silently
            items.put(("error", EngineError(f"{self.base_url}: {type(exc).__name__}: {exc}")))
