"""One chat turn, for every front door: the chat app, `crofter ask`, `crofter eval` and `crofter serve`.

A turn takes the user's text and what it may use (passages from documents, tools with an
approver, a cancel event) and yields typed events; front doors only render or translate
them, and the history store commits from the final `Done`:

    >>> for ev in run_turn(session, "What is 17 * 23?", tools=TurnTools(registry, Policy(), approve)):  # doctest: +SKIP
    ...     if isinstance(ev, TextDelta): print(ev.text, end="")
    ...     elif isinstance(ev, Done): print(ev.result.completion_tokens, ev.fit.dropped)

The session's history gets the turn when it is done: the user's own text (not the passages
sent with it), tool results as the model saw them, and the answer without its reasoning trace,
so later turns never see `<think>` text or quoted sources again.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

from .budget import Fit
from .engine import Result
from .session import ChatSession

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# -- events -----------------------------------------------------------------
@dataclass
class TextDelta:
    """More of the answer."""

    text: str


@dataclass
class ThinkingDelta:
    """More of the reasoning trace (`<think>...</think>`), shown apart from the answer."""

    text: str


@dataclass
class ToolStarted:
    """The model asked for a call; it is checked (schema, policy, approval) and run next."""

    name: str
    arguments: dict


@dataclass
class ToolFinished:
    """A call ended: ok, error, denied or repeated (a `tools.calling.ToolCall`)."""

    call: object


@dataclass
class SourcesFound:
    """Passages retrieved for the question, numbered as the model sees them (rag.cite.Source)."""

    sources: list


@dataclass
class Done:
    """The turn ended. `result` is the last generation's usage and timings (its text is the raw
    output); `answer` and `thinking` are what the user reads; `cited` the sources the answer cites;
    `message_ids` the ids the history store gave the turn's messages (set by ChatController)."""

    answer: str
    result: Result
    fit: Fit
    finish_reason: str
    thinking: str = ""
    calls: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    cited: list = field(default_factory=list)
    grounded: bool = False
    message_ids: list[int] = field(default_factory=list)
    # The answer does not state the result of the last ok call of a tool whose result is the answer
    # (the calculator's): the app, `ask` and `serve` flag it.
    contradicts_result: bool = False


TurnEvent = Union[TextDelta, ThinkingDelta, ToolStarted, ToolFinished, SourcesFound, Done]


@dataclass
class TurnTools:
    """Tools for a turn: the registry, who decides (policy, then `approve(tool, args, tainted)`
    for calls the policy marks `ask`), the call cap, and whether calls are run here or handed
    back to the caller (`defer`: an API client that runs its own tools); `require`: the model
    must call a tool before it may answer (an API client's tool_choice "required" or named)."""

    registry: object
    policy: object
    approve: Callable[[object, dict, bool], bool]
    max_calls: int = 4
    defer: bool = False
    require: bool = False


# -- reasoning traces ---------------------------------------------------------
class ThinkSplit:
    """Splits streamed text into thinking and answer deltas.

    A trace is recognised only at the start of the reply (an opening tag before any other
    text, or none at all when the prompt already opened it, as R1-style templates do), so an
    answer that mentions `<think>` later is left alone and ordinary replies pass through
    without being held back."""

    def __init__(self, opened: bool = False) -> None:
        self.thinking = opened
        self.state = "think" if opened else "start"  # start -> (think ->) answer
        self._held = ""
        self.answer: list[str] = []
        self.trace: list[str] = []

    def feed(self, text: str) -> list:
        out: list = []
        buf = self._held + text
        self._held = ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if not stripped:
                    self._held = buf
                    break
                if stripped.startswith(THINK_OPEN):
                    self.state, buf = "think", stripped[len(THINK_OPEN):]
                    continue
                if THINK_OPEN.startswith(stripped):
                    self._held = buf  # could still become the opening tag
                    break
                self.state = "answer"
                continue
            if self.state == "think":
                at = buf.find(THINK_CLOSE)
                if at >= 0:
                    self._emit(out, ThinkingDelta, buf[:at])
                    self.state, buf = "after", buf[at + len(THINK_CLOSE):]
                    continue
                hold = _partial_tail(buf, THINK_CLOSE)
                self._emit(out, ThinkingDelta, buf[:len(buf) - hold])
                self._held = buf[len(buf) - hold:]
                break
            if self.state == "after":  # the blank lines between the trace and the answer
                buf = buf.lstrip()
                if not buf:
                    break
                self.state = "answer"
            self._emit(out, TextDelta, buf)
            break
        return out

    def close(self) -> list:
        """The end of the reply: what was held back is what it looked like."""
        out: list = []
        held, self._held = self._held, ""
        if held:
            self._emit(out, ThinkingDelta if self.state == "think" else TextDelta, held if self.state != "start" else held.lstrip() or "")
        return out

    def _emit(self, out: list, kind, text: str) -> None:
        if text:
            (self.trace if kind is ThinkingDelta else self.answer).append(text)
            out.append(kind(text))


def _partial_tail(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def opens_thinking(prompt_text: str) -> bool:
    """The rendered prompt ends inside a reasoning trace (the template wrote `<think>`)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


# -- the turn ------------------------------------------------------------------
def run_turn(session: ChatSession, text: str | None, *, ground: Callable[[str, int, int], object] | None = None,
             tools: TurnTools | None = None, cancel: threading.Event | None = None) -> Iterator[TurnEvent]:
    """One turn of `session`. `text` is the user's message (None: answer the history as it
    stands, e.g. after a regenerate or a tool result from an API client). `ground(question,
    n_ctx, max_tokens)` returns a documents.GroundedTurn: the question goes out with numbered
    passages sized for the engine's window. The history is updated when the turn ends (a
    stopped reply included); an error leaves it as it was."""
    history = list(session.messages)
    while text is None and history and history[-1]["role"] == "assistant":
        history.pop()
    grounded = None
    if text is not None:
        prompt = text
        if ground is not None:
            grounded = ground(text, session.engine.n_ctx, session.sampling.max_tokens)
            prompt = grounded.prompt
            yield SourcesFound(list(grounded.sources))
        history.append({"role": "user", "content": prompt})
    if tools is not None:
        from .tools.calling import ToolLoop

        loop = ToolLoop(session, tools.registry, tools.policy, tools.approve, max_calls=tools.max_calls,
                        defer=tools.defer, require=tools.require)
        outcome = yield from loop.events(history, cancel, tainted=grounded is not None, message=text)
        done = Done(outcome.turn.answer, outcome.result, outcome.fit, outcome.turn.finish_reason,
                    thinking=outcome.turn.thinking, calls=list(outcome.turn.calls),
                    contradicts_result=outcome.turn.contradicts_result)
        added = outcome.added
    else:
        done = yield from _reply(session, history, cancel)
        added = [{"role": "assistant", "content": done.answer}]
    if grounded is not None:
        grounded.finish(done.answer)
        done.sources, done.cited, done.grounded = list(grounded.sources), list(grounded.cited), True
        history[-1] = {"role": "user", "content": text}  # later turns see the question, not the passages
    session.messages = history + added
    session.cut = done.fit.cut
    yield done


def finish(events: Iterator[TurnEvent]) -> Done:
    """Run a turn to its end without rendering it; its `Done`."""
    done = None
    for ev in events:
        if isinstance(ev, Done):
            done = ev
    if done is None:
        raise RuntimeError("the turn ended without a result")
    return done


def _reply(session: ChatSession, messages: list[dict], cancel) -> Iterator[TurnEvent]:
    """Stream one unconstrained reply, its reasoning trace split off."""
    fit = session.fit(messages)
    split = ThinkSplit(opens_thinking(session.engine.template.render(fit.messages)))
    result = None
    for ev in session.engine.stream(fit.prompt_tokens, session.sampling, cancel):
        if ev.text:
            yield from split.feed(ev.text)
        if ev.done is not None:
            result = ev.done
    yield from split.close()
    answer = "".join(split.answer)
    return Done(answer, result, fit, result.finish_reason, thinking="".join(split.trace))


# -- a tool step's answer, streamed out of its JSON object ------------------------
_ANSWER_HEAD = re.compile(r'\s*\{\s*"tool"\s*:\s*"none"\s*,\s*"answer"\s*:\s*"')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class AnswerStream:
    """Feeds on the raw text of a constrained tool step and returns the decoded characters of
    `{"tool": "none", "answer": "..."}`'s string as they arrive (nothing for a call)."""

    def __init__(self) -> None:
        self.raw = ""
        self._at: int | None = None  # where the answer's string body starts in raw
        self._pos = 0
        self.closed = False
        self.text = ""

    def feed(self, piece: str) -> str:
        self.raw += piece
        if self.closed:
            return ""
        if self._at is None:
            m = _ANSWER_HEAD.match(self.raw)
            if m is None:
                return ""
            self._at = self._pos = m.end()
        out: list[str] = []
        raw, i = self.raw, self._pos
        while i < len(raw):
            c = raw[i]
            if c == '"':
                self.closed = True
                break
            if c != "\\":
                out.append(c)
                i += 1
                continue
            if i + 1 >= len(raw):
                break  # the escape is not complete yet
            e = raw[i + 1]
            if e == "u":
                decoded, used = _unicode_escape(raw, i)
                if decoded is None:
                    break
                out.append(decoded)
                i += used
                continue
            out.append(_ESCAPES.get(e, e))
            i += 2
        self._pos = i
        delta = "".join(out)
        self.text += delta
        return delta


def _unicode_escape(raw: str, i: int) -> tuple[str | None, int]:
    """A \\uXXXX escape at raw[i] (and its low surrogate, if any): (text, length), or (None, 0)
    while it is incomplete."""
    hexa = raw[i + 2:i + 6]
    if len(hexa) < 4:
        return None, 0
    try:
        code = int(hexa, 16)
    except ValueError:
        return "\ufffd", 6
    if 0xD800 <= code < 0xDC00:  # a high surrogate: its pair follows
        tail = raw[i + 6:i + 12]
        if len(tail) < 6:
            return None, 0
        if tail.startswith("\\u"):
            try:
                low = int(tail[2:], 16)
            except ValueError:
                low = 0
            if 0xDC00 <= low < 0xE000:
                return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), 12
        return "\ufffd", 6
    return chr(code), 6
