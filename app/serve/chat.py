"""/v1/chat/completions: an OpenAI chat request becomes one `turn.run_turn`; its events
become a `chat.completion` object or `chat.completion.chunk` SSE events.

Translation of the history (what the chat template can render):
- system and developer messages -> one leading system message;
- an assistant message with `tool_calls` -> the call as the tool loop writes it,
  `{"tool": name, "arguments": {...}}`;
- a `tool` message -> a role "tool" message where the template renders tools and tool
  results (as the tool loop does), else the loop's user-role "Tool result (name, ok): ..."
  (`tools.calling.result_message`);
- the last message, if it is the user's, is the turn's text (so grounding sees it);
  otherwise the turn answers the history as it stands (`text=None`).

Tools (`tools` + `tool_choice`) run the turn's tool loop with `TurnTools(defer=True)`: the
model's first call comes back as OpenAI `tool_calls` with finish_reason "tool_calls".
`response_format` json_object/json_schema become a llama.cpp grammar in Sampling.grammar, as
does a GBNF `grammar` field (llama-server's extension; crofter's remote engine sends it).
A reasoning trace (`<think>`) is `reasoning_content`. `crofter.collections` grounds the turn
on the user's documents; the response's `crofter` field carries the sources. `crofter.tools`
names crofter's own tools, which the server runs in the turn's tool loop (its policy decides;
a call that would need asking is denied) and lists in `crofter.calls` (streamed: one chunk
with `crofter.call` as each call ends).

`logprobs` (+ `top_logprobs`) are read from llama.cpp's logits as each token is sampled
(app/logprobs.py): the answer's tokens, a reasoning trace left out; streamed, they come whole in
the chunk that carries finish_reason. Not with tools, nor on a remote model.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

from .client_tools import builtin_registry, call_record, choice_of, openai_calls, registry_for, serve_policy
from .errors import ApiError

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "tool_limit": "stop", "cancelled": "stop"}


def text_of(content, where: str) -> str:
    """A message's content as text (a list of text parts is joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}.{i}: only text parts are supported (got type {part.get('type')!r})", f"{where}.{i}")
        parts.append(part["text"])
    return "".join(parts)


def translate(messages, tool_role: bool) -> tuple[list[dict], str | None]:
    """(history, text): the request's messages as the turn takes them (see the module doc)."""
    from ..tools.calling import ToolCall, result_message

    system: list[str] = []
    history: list[dict] = []
    names: dict[str, str] = {}  # tool_call_id -> function name
    for i, m in enumerate(messages):
        content = text_of(m.content, f"messages.{i}.content")
        if m.role in ("system", "developer"):
            if history:
                history.append({"role": "system", "content": content})
            else:
                system.append(content)
        elif m.role == "user":
            history.append({"role": "user", "content": content})
        elif m.role == "assistant":
            if m.tool_calls:
                calls = []
                for c in m.tool_calls:
                    try:
                        args = json.loads(c.function.arguments or "{}")
                    except json.JSONDecodeError:
                        raise ApiError(400, f"messages.{i}.tool_calls: arguments of {c.function.name!r} are not valid JSON",
                                       f"messages.{i}.tool_calls") from None
                    names[c.id] = c.function.name
                    calls.append(json.dumps({"tool": c.function.name, "arguments": args}, ensure_ascii=False))
                content = "\n".join(calls)
            history.append({"role": "assistant", "content": content})
        else:  # tool
            name = names.get(m.tool_call_id or "") or m.name or "tool"
            if tool_role:
                history.append({"role": "tool", "name": name, "content": f"ok: {content}"})
            else:
                history.append({"role": "user", "content": result_message(ToolCall(name, {}, "ok", content))})
    if system:
        history.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if history and history[-1]["role"] == "user" and messages[-1].role == "user":
        return history[:-1], history[-1]["content"]
    if not any(h["role"] in ("user", "tool") for h in history):
        raise ApiError(400, "messages: there is no user message to answer", "messages")
    return history, None


def grammar_for(fmt):
    """The llama.cpp grammar of a response_format (None for text)."""
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp import LlamaGrammar

    if fmt.type == "json_object":
        schema = {"type": "object"}
    else:
        if fmt.json_schema is None or not fmt.json_schema.schema_:
            raise ApiError(400, "response_format.json_schema.schema: required for type json_schema", "response_format.json_schema")
        schema = fmt.json_schema.schema_
    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:
        raise ApiError(400, f"response_format.json_schema.schema: cannot be turned into a grammar ({exc})",
                       "response_format.json_schema.schema") from None


def gbnf_grammar(text: str):
    """The request's `grammar` field as a LlamaGrammar (parsed by the engine before it runs)."""
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_string(text, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ApiError(400, f"grammar: not a valid GBNF grammar ({exc})", "grammar") from None


def sampling_for(req, settings, grammar=None):
    """The request's sampling over the server's defaults (Settings)."""
    from ..engine import Sampling

    s = Sampling.from_settings(settings, req.stops())
    changes = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed",
                                           "frequency_penalty", "presence_penalty")
               if getattr(req, k) is not None}
    tokens = getattr(req, "max_completion_tokens", None) or getattr(req, "max_tokens", None)
    if tokens is not None:
        changes["max_tokens"] = tokens
    return replace(s, grammar=grammar, **changes)


class ChatPlan:
    """What one chat request will run, checked before it joins the model's line."""

    def __init__(self, req, settings, docs=None, allow_tools=()):
        self.req = req
        self.settings = settings
        self.docs = docs  # () -> documents.DocsService for crofter.collections (opened on first use)
        self.builtin = list(req.crofter.tools) if req.crofter else []  # crofter tools the server runs
        if self.builtin and req.crofter.collections and "search_documents" not in self.builtin:
            self.builtin.append("search_documents")  # with tools on, the model searches the collections itself
        self.allow_tools = list(allow_tools)
        if self.builtin and req.tools:
            raise ApiError(400, "crofter.tools: cannot be combined with tools (the client's own functions)", "crofter.tools")
        self.mode, named = choice_of(req.tool_choice) if (req.tools or self.builtin) else ("none", None)
        if self.mode == "named" and not (req.tools or self.builtin):
            raise ApiError(400, "tool_choice: names a function but the request has no tools", "tool_choice")
        if self.builtin and self.mode != "none":  # tool_choice applies to crofter's tools as to the client's
            if named is not None and named not in self.builtin:
                raise ApiError(400, f"tool_choice: no tool named {named!r} in crofter.tools", "tool_choice")
            self.builtin = [named] if named is not None else self.builtin
        else:
            self.builtin = []
        self.registry = registry_for(req.tools, only=named) if self.mode != "none" and req.tools else None
        if (self.registry is not None or self.builtin) and req.response_format is not None and req.response_format.type != "text":
            raise ApiError(400, "response_format: cannot be combined with tools (the tool loop has its own grammar)",
                           "response_format")
        self.grammar = grammar_for(req.response_format)
        if req.grammar is not None:
            if self.registry is not None or self.builtin or self.grammar is not None:
                raise ApiError(400, "grammar: cannot be combined with tools or a response_format", "grammar")
            self.grammar = gbnf_grammar(req.grammar)
        self.collections = list(req.crofter.collections) if req.crofter else []
        if self.collections and self.registry is not None and self.mode in ("required", "named"):
            raise ApiError(400, "crofter.collections: cannot be combined with a forced tool_choice", "crofter.collections")
        if self.collections and docs is None:
            raise ApiError(400, "crofter.collections: documents are not available on this server", "crofter.collections")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        if req.logprobs and (self.registry is not None or self.builtin):
            raise ApiError(400, "logprobs: not available with tools (a call is written in the tool loop's JSON)", "logprobs")
        self.logprobs = (req.top_logprobs or 0) if req.logprobs else None

    def events(self, engine, cancel):
        """The turn's events (run on the job thread)."""
        from ..engine import EngineError
        from ..session import ChatSession
        from ..tools.calling import uses_tool_role
        from ..tools.policy import Policy
        from ..turn import TurnTools, run_turn

        if self.req.grammar is not None:
            try:  # a grammar llama.cpp cannot parse is the client's mistake: a 400, before the turn
                engine.check_grammar(self.grammar)
            except EngineError as exc:
                raise ApiError(400, f"grammar: {exc}", "grammar") from None
        if self.logprobs is not None and getattr(engine, "llm", None) is None:
            raise ApiError(400, f"logprobs: model {self.req.model!r} is a remote model; logprobs need a local GGUF", "logprobs")
        tools = self.registry.tools if self.registry is not None else {}
        history, text = translate(self.req.messages, uses_tool_role(engine.template, tools))
        sampling = replace(sampling_for(self.req, self.settings, self.grammar), logprobs=self.logprobs)
        session = ChatSession(engine, sampling, messages=history)
        uses = {}
        if self.registry is not None:
            uses["tools"] = TurnTools(self.registry, Policy(), lambda *a: False, max_calls=1, defer=True,
                                      require=self.mode in ("required", "named"))
        if self.builtin:  # the model searches the collections itself (search_documents), as `ask --tools`
            search = self.docs().search(self.collections) if self.collections else None
            registry = builtin_registry(self.settings, self.builtin, search)
            uses["tools"] = TurnTools(registry, serve_policy(registry, self.allow_tools), lambda *a: False,
                                      require=self.mode in ("required", "named"))
        elif self.collections and text is not None:
            from .. import documents

            k = (self.req.crofter.k if self.req.crofter else None) or self.settings.rag_top_k
            uses["ground"] = documents.grounder(self.docs().search(self.collections), k)
        yield from run_turn(session, text, cancel=cancel, **uses)


def usage(result) -> dict:
    p, c = (result.prompt_tokens, result.completion_tokens) if result is not None else (0, 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def timings(result) -> dict | None:
    """How the last generation went, measured by the engine (llama-server answers with its own
    `timings` too): a client's TTFT minus `ttft_ms` is what the HTTP path added."""
    if result is None:
        return None
    return {"ttft_ms": round(result.ttft_s * 1000, 2), "prompt_tokens_evaluated": result.prompt_tokens_evaluated,
            "decode_tokens_per_s": round(result.decode_tokens_per_s, 2), "total_ms": round(result.total_s * 1000, 2)}


def extension(done) -> dict | None:
    """The response's `crofter` field: the engine's timings, cited sources of a grounded turn,
    the calls crofter ran."""
    ext: dict = {"timings": timings(done.result)} if done.result is not None else {}
    if done.grounded:
        ext.update(sources=[s.as_dict() for s in done.cited], retrieved=[s.as_dict() for s in done.sources])
    if done.calls and done.finish_reason != "tool_calls":  # not the client's own (deferred) calls
        ext["calls"] = [call_record(c) for c in done.calls]
        ext["contradicts_result"] = done.contradicts_result
    return ext or None


def _entry(token: bytes, logprob: float) -> dict:
    return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(token)}


def logprobs_of(done) -> dict | None:
    """OpenAI's `logprobs` of a choice: the answer's tokens (a reasoning trace before it and a
    stop sequence after it left out), each with its alternatives; None when not asked for."""
    from ..logprobs import within

    if done.result is None or done.result.logprobs is None:
        return None
    raw, answer = done.result.text, done.answer
    start = len(raw) - len(answer) if raw.endswith(answer) else 0
    return {"content": [dict(_entry(t.token, t.logprob), top_logprobs=[_entry(b, lp) for b, lp in t.top])
                        for t in within(done.result.logprobs, start, len(raw))], "refusal": None}


def completion(done, model: str, cid: str) -> dict:
    """A non-streamed `chat.completion` from the turn's Done."""
    message: dict = {"role": "assistant", "content": done.answer}
    if done.finish_reason == "tool_calls" and done.calls:
        message = {"role": "assistant", "content": None, "tool_calls": openai_calls(done.calls)}
    if done.thinking:
        message["reasoning_content"] = done.thinking
    body = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs_of(done),
                         "finish_reason": FINISH.get(done.finish_reason, "stop")}],
            "usage": usage(done.result)}
    ext = extension(done)
    if ext is not None:
        body["crofter"] = ext
    return body


class Chunks:
    """`chat.completion.chunk` objects for one streamed reply."""

    def __init__(self, model: str, cid: str, include_usage: bool):
        self.model, self.cid, self.include_usage = model, cid, include_usage
        self.created = int(time.time())

    def chunk(self, delta: dict, finish: str | None = None, logprobs: dict | None = None, **extra) -> str:
        body = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return json.dumps(body, ensure_ascii=False)

    def for_event(self, ev) -> list[str]:
        """The chunks of one turn event (the last ones for its Done)."""
        from ..turn import Done, TextDelta, ThinkingDelta, ToolFinished

        if isinstance(ev, ToolFinished):  # a crofter tool the server ran (crofter.tools)
            return [self.chunk({}, crofter={"call": call_record(ev.call)})]
        if isinstance(ev, TextDelta):
            return [self.chunk({"content": ev.text})]
        if isinstance(ev, ThinkingDelta):
            return [self.chunk({"reasoning_content": ev.text})]
        if not isinstance(ev, Done):
            return []  # ToolStarted: its ToolFinished follows; SourcesFound goes out with Done
        out = []
        if ev.finish_reason == "tool_calls" and ev.calls:
            calls = [dict(c, index=i) for i, c in enumerate(openai_calls(ev.calls))]
            out.append(self.chunk({"tool_calls": calls}))
        ext = extension(ev)
        # Streamed, the answer's token logprobs come whole in the chunk that carries finish_reason.
        out.append(self.chunk({}, FINISH.get(ev.finish_reason, "stop"), logprobs_of(ev), **({"crofter": ext} if ext else {})))
        if self.include_usage:
            body = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "system_fingerprint": None, "choices": [], "usage": usage(ev.result)}
            out.append(json.dumps(body))
        return out

    def first(self) -> str:
        return self.chunk({"role": "assistant", "content": ""})


def new_id(kind: str = "chatcmpl") -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"
