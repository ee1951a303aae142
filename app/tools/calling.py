"""The tool loop: constrained output, validated arguments, policy, a call cap, loop detection.

With tools on, every model turn is constrained by a llama.cpp grammar built from
the tools' JSON schemas, so the output is always one JSON object, either

    {"tool": "calculator", "arguments": {"expression": "17 * 23"}}    a call of a real tool
    {"tool": "none", "answer": "17 times 23 is 391."}                 the final answer

Small models therefore cannot write calls as prose or invent tool names. Arguments
are validated again (jsonschema) before anything runs; errors go back to the model
as the tool's result. A turn stops calling after `max_calls`, and a repeated
identical call is not run twice: the model is then made to answer. Whatever did
not come through the grammar (a remote endpoint, the unconstrained benchmark) is
held to the same rules: a reply that tries to be a call but is not one object of
that shape is an error fed back (and counts as a call); arguments over
`ARGUMENT_CHARS` are refused unread; results and errors are cut at `RESULT_CHARS`;
and a call after the model was told to answer ends the turn (finish_reason
"tool_limit") without running.

When the model's GGUF chat template renders tool definitions (found by rendering, see
template.ChatTemplate.native_tools), the tools reach the model through its own
template, in the markup it was trained on, and results come back as role "tool"
messages when the template renders those; the calls themselves stay in the
constrained JSON above. Templates without tool support get the tools listed in a
system message and results as user-role messages, which every template renders.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from ..session import ChatSession
from .policy import Policy
from .registry import ToolRegistry
from .schema import Tool
# call_schema and uses_tool_role are used by crofter serve and the tests through this module too.
from .step import (NO_TOOL, after_thinking, argument_error, call_schema, can_rank, clip,  # noqa: F401
                   decide_name, instructions, mentioned, not_a_call, output_schema, partial_answer, rank,
                   rank_channel, stated_answer_gbnf, states, uses_tool_role)

RESULT_CHARS = 4000
ARGUMENT_CHARS = 8000  # a call's arguments, as JSON; larger ones are refused without validating
STATE_CHARS = 200  # a result that answers the message and is this short becomes the answer itself


@dataclass
class ToolCall:
    """One requested call and what became of it."""

    name: str
    arguments: dict
    status: str  # "ok", "error" (the tool's, or a bad request), "denied" (policy or user), "repeated"
    result: str = ""


@dataclass
class ToolTurn:
    """The outcome of one user message with tools on. `messages`: the transcript the model saw
    (the instructions, each call and result, the answer)."""

    answer: str
    calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    thinking: str = ""
    messages: list[dict] = field(default_factory=list)
    # How the first step's tool was chosen: [(name, score)], best first ("rank"), or [(name, 0.0)].
    choice: list = field(default_factory=list)
    # The answer does not state the result of the last ok call of a tool whose result is the answer.
    contradicts_result: bool = False

    def calls_json(self) -> list[dict]:
        return [asdict(c) for c in self.calls]


def result_message(call: ToolCall) -> str:
    """How a call's result is shown to the model (a user-role message: every template has one)."""
    return f"Tool result ({call.name}, {call.status}):\n{call.result}"


@dataclass
class ToolOutcome:
    """What `ToolLoop.events` returns: the turn, the last generation's result and fit, and the
    messages the session keeps (each result as the model saw it, then the answer)."""

    turn: ToolTurn
    result: object
    fit: object
    added: list[dict]


class ToolLoop:
    """Runs one user message through model -> tool -> model ... -> answer.

    The session is read, never edited: the loop works on its own copy of the history with the
    tool instructions added, and hands back what the session should keep."""

    def __init__(self, session: ChatSession, registry: ToolRegistry, policy: Policy,
                 approve: Callable[[Tool, dict, bool], bool], max_calls: int = 4, constrained: bool = True,
                 on_call: Callable[[ToolCall], None] | None = None, defer: bool = False, require: bool = False,
                 choose: str = "channel", examples: str = "generated", listing: bool = True, state_result: bool = True,
                 after: str = "answers", copy: bool = True):
        """constrained=False drops the grammar (the instructions alone): only for the benchmark
        that shows what the grammar buys. defer=True stops at the first call without running it
        (status "requested"): the caller runs its own tools. require=True: the first step must be a call.

        The rest are the options bench/bench_tools.py measures (the defaults won there):
        choose: how the first step's tool is picked (step.CHOICES; "rank" and "channel" need a local engine
        and falls back to "sample" elsewhere). examples: step.instructions'. listing: path
        arguments limited to the files that exist (Tool.choices). state_result: after an ok call
        of a tool whose result is the answer (Tool.answers), the answer is that result ("more":
        it begins with it, the model's words after).
        after: when a result is followed by the answer alone: "answers" (those tools), "ok"
        (any ok result), "never". copy: tool steps sample without the repeat penalty (with it, the
        numbers of "What is 17 * 23?", already in the context, lost to a "." and the call was .17 * .23)."""
        from llama_cpp import LlamaGrammar

        self.session = session
        self.registry = registry
        self.policy = policy
        self.approve = approve
        self.max_calls = max_calls
        self.on_call = on_call
        self.defer = defer
        self.message = ""  # the user's message of the turn running (events sets it)
        self._answered: dict[int, bool] = {}  # id(call) -> _answers(call), for this turn's calls
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        from ..turn import opens_thinking

        tools = [t.narrowed() if listing else t for t in registry.tools.values()]
        tools = [t for t in tools if t is not None]
        self.tools = {t.name: t for t in tools}  # this turn's tools (path enums filled in)
        self.choose, self.state_result, self.after, self.require = choose, state_result, after, require
        self.listing, self.copy = listing, copy
        template = getattr(session.engine, "template", None)
        # A reasoning model whose template opens <think> writes its trace first; the call grammar
        # then applies after </think>.
        self.thinks = template is not None and opens_thinking(template.render([{"role": "user", "content": "?"}]))
        self._grammar = self._answer_only = self._first = None
        self._schema_of: dict[int, dict] = {}  # id(grammar) -> its JSON schema (what a remote engine sends)
        self._branches: dict[str, object] = {}  # tool name -> the grammar of a call of it alone
        self.constrained = constrained

        def grammar(schema: dict, text: str | None = None):
            text = text or json_schema_to_gbnf(json.dumps(schema))
            g = LlamaGrammar.from_string(after_thinking(text) if self.thinks else text, verbose=False)
            self._schema_of[id(g)] = schema
            return g

        self._make_grammar = grammar
        if constrained:
            self._grammar, self._answer_only = grammar(output_schema(tools)), grammar(output_schema(tools, False))
            self._first = grammar(output_schema(tools, allow_answer=False)) if require and tools else self._grammar
        self.native = bool(getattr(template, "native_tools", False)) and bool(tools)
        self.tool_role = uses_tool_role(template, tools)
        self.specs = [t.spec() for t in tools] if self.native else None  # for the template to render
        self.instructions = instructions(tools, listed=not self.native, examples=examples)

    def branch(self, name: str, text: str = ""):
        """The grammar of the step once its tool is chosen: a call of `name` (its listed arguments
        limited to those the user's message `text` names, when it names some), or the answer."""
        if name == NO_TOOL:
            return self._answer_only
        t = mentioned(self.tools[name], text) if self.listing and text else self.tools[name]
        key = json.dumps([name, t.parameters], sort_keys=True)
        if key not in self._branches:
            self._branches[key] = self._make_grammar(call_schema(t))
        return self._branches[key]

    def choose_first(self, msgs: list[dict]) -> tuple[object, list]:
        """The first step's grammar and how it was chosen ([(name, score)], best first)."""
        names = list(self.tools) + ([] if self.require else [NO_TOOL])
        engine = self.session.engine
        text = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        if not self.constrained or self.thinks or not self.tools or self.choose == "sample":
            return self._first, []
        if self.choose == "decide":
            name = decide_name(engine, self.session.sampling, list(self.tools.values()), text, not self.require,
                               self._make_grammar)
            return (self.branch(name, text), [(name, 0.0)]) if name in names else (self._first, [])
        if not can_rank(engine):
            return self._first, []
        if self.choose == "channel":
            ranked = rank_channel(engine, list(self.tools.values()), text, not self.require)
        else:
            ranked = rank(engine, self.session.fit(msgs, self.specs).prompt_tokens, names)
        return self.branch(ranked[0][0], text), ranked

    def _stated(self, call: ToolCall):
        """The answer grammar after `call`, when its result is the answer and short enough to state."""
        t = self.tools.get(call.name)
        if not (self.constrained and self.state_result and t is not None and call.status == "ok"
                and self._answers(call) and 0 < len(call.result) <= STATE_CHARS):
            return None
        more = self.state_result == "more"
        return self._make_grammar(output_schema([], False), stated_answer_gbnf(call.result.strip(), more))

    def _answers(self, call: ToolCall) -> bool:
        """Whether `call`'s result is, by itself, the answer to this turn's message (Tool.answers);
        asked once per call (a file tool's predicate walks the roots)."""
        if id(call) not in self._answered:
            t = self.tools.get(call.name)
            self._answered[id(call)] = t is not None and t.answers_call(call.arguments, self.message)
        return self._answered[id(call)]

    def scaffold(self, history: list[dict]) -> list[dict]:
        """`history` with the tool instructions joined to its system prompt (or as one)."""
        msgs = list(history)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": (msgs[0]["content"] + "\n\n" + self.instructions).strip()}
        else:
            msgs.insert(0, {"role": "system", "content": self.instructions})
        return msgs

    def generate(self, prompt_tokens: list[int], sampling, cancel=None):
        """The engine's stream of one step (tests script the model's replies here)."""
        return self.session.engine.stream(prompt_tokens, sampling, cancel)

    def _step(self, msgs: list[dict], grammar, cancel):
        """One constrained generation, its answer streamed as it is written. Returns (the parsed
        object, or None if it is not a call or answer object: cut off by max_tokens, or
        unconstrained; the raw text; the finish reason; the result; the fit; the answer text
        streamed so far)."""
        from ..turn import AnswerStream, TextDelta, ThinkingDelta, ThinkSplit

        s = self.session
        fit = s.fit(msgs, self.specs)
        stream, split = AnswerStream(), ThinkSplit(opened=True) if self.thinks else None
        result = None

        def pieces(text: str):
            """The step's text: the trace as it is, the object's answer decoded as it comes."""
            for ev in (split.feed(text) if split is not None and text else split.close() if split is not None
                       else [TextDelta(text)]):
                if isinstance(ev, ThinkingDelta):
                    yield ev
                else:
                    delta = stream.feed(ev.text)
                    if delta:
                        yield TextDelta(delta)

        sampling = replace(s.sampling, grammar=grammar, json_schema=self._schema_of.get(id(grammar)))
        if self.copy:  # arguments and stated results are copied from the context: no penalty for that
            sampling = replace(sampling, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
        for ev in self.generate(fit.prompt_tokens, sampling, cancel):
            if ev.text:
                yield from pieces(ev.text)
            if ev.done is not None:
                result = ev.done
        if not stream.raw and not (split and split.trace) and result.text:
            yield from pieces(result.text)  # a stream that gave its text only with the result
        if split is not None:
            yield from pieces("")
        raw = stream.raw
        thinking = "".join(split.trace) if split is not None else ""
        try:
            # strict=False: the grammar's string rule ([^"\\] | escapes) admits raw control
            # characters (a tab, a newline) inside strings, which strict JSON refuses.
            obj = json.loads(raw, strict=False)
        except json.JSONDecodeError:
            obj = None  # cut off by max_tokens before the object closed (or, unconstrained, not JSON)
        if not isinstance(obj, dict) or "tool" not in obj:
            obj = None
        return obj, raw, result.finish_reason, result, fit, stream.text, thinking

    def decide(self, history: list[dict], grammar=None) -> tuple[dict | None, str, str]:
        """One step on `history` (ending with the user's message), not streamed: (the parsed
        object or None, the raw text, the finish reason). `grammar`: the tool-step grammar
        (by default, the first step's, chosen as `choose` says)."""
        msgs = self.scaffold(history)
        gen = self._step(msgs, self.choose_first(msgs)[0] if grammar is None else grammar, None)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value[:3]

    def events(self, history: list[dict], cancel=None, tainted: bool = False, message: str | None = None):
        """The turn as events (TextDelta of the answer, ToolStarted, ToolFinished); returns a
        ToolOutcome. `history` ends with the user's message; `tainted`: that message itself
        carries document passages; `message`: what the user wrote (by default the last user
        entry of `history` that is not a tool result: a regenerated turn has no new text)."""
        from ..turn import TextDelta, ToolFinished, ToolStarted

        msgs = self.scaffold(history)
        if message is None:
            said = (m.get("content") for m in reversed(history) if m.get("role") == "user")
            message = next((c for c in said if isinstance(c, str) and not c.startswith("Tool result (")), "")
        self.message, self._answered = message, {}
        kept: list[dict] = []  # what the session keeps: results as the chat's history shows them
        turn = ToolTurn(answer="", messages=msgs)
        seen: dict[str, str] = {}
        grammar, turn.choice = self.choose_first(msgs)
        closed = False  # the model was told to answer: a cap was reached or a call repeated
        while True:
            obj, raw, finish, result, fit, streamed, thinking = yield from self._step(msgs, grammar, cancel)
            turn.thinking += thinking
            if finish in ("cancelled", "error"):  # stopped, or a remote stream broke: keep what came
                turn.answer, turn.finish_reason = streamed or partial_answer(raw), finish
                break
            if obj is not None and obj["tool"] == NO_TOOL:
                turn.answer = str(obj.get("answer", ""))
                if turn.answer.startswith(streamed) and len(turn.answer) > len(streamed):
                    yield TextDelta(turn.answer[len(streamed):])
                break
            if obj is None and (finish == "length" or not raw.lstrip().startswith(("{", "["))):
                # Cut off mid-object (or, unconstrained, an answer in plain words).
                turn.answer, turn.finish_reason = partial_answer(raw), finish
                if turn.answer.startswith(streamed) and len(turn.answer) > len(streamed):
                    yield TextDelta(turn.answer[len(streamed):])
                break
            if closed:  # only a model outside the grammar gets here; it is not run, and not asked again
                turn.finish_reason = "tool_limit"
                break
            msgs.append({"role": "assistant", "content": clip(raw, ARGUMENT_CHARS)})
            if obj is None:
                call = ToolCall("(invalid)", {}, "error", not_a_call(raw))
            else:
                name, args = str(obj["tool"])[:64], obj.get("arguments", {})
                args = args if isinstance(args, dict) else {"_": args}
                if self.defer:
                    turn.calls.append(ToolCall(name, args, "requested"))
                    turn.finish_reason = "tool_calls"
                    break
                yield ToolStarted(name, args)
                call = self._call(name, args, tainted, seen)
            turn.calls.append(call)
            yield ToolFinished(call)
            if self.on_call is not None:
                self.on_call(call)
            tainted = True  # what comes back is data, and may carry injected instructions
            grammar = self._grammar
            note = ""
            stated = self._stated(call)
            if call.status == "repeated" or len(turn.calls) >= self.max_calls:
                grammar, closed = stated or self._answer_only, True
                note = "\nNo more tool calls this turn: answer now."
            elif call.status == "ok" and self.constrained and (
                    self.after == "ok" or (self.after == "answers" and self._answers(call))):
                grammar = stated or self._answer_only
            if self.tool_role:
                msgs.append({"role": "tool", "name": call.name, "content": f"{call.status}: {call.result}{note}"})
            else:
                msgs.append({"role": "user", "content": result_message(call) + note})
            kept.append({"role": "user", "content": result_message(call)})
        last = next((c for c in reversed(turn.calls) if c.status == "ok"), None)
        if last is not None and self._answers(last) and len(last.result) <= STATE_CHARS and turn.finish_reason == "stop":
            # (a longer result, a file's text, is not stated: a summary of it is no contradiction)
            turn.contradicts_result = not states(turn.answer, last.result)
        msgs.append({"role": "assistant", "content": turn.answer})
        return ToolOutcome(turn, result, fit, kept + [{"role": "assistant", "content": turn.answer}])

    def run(self, text: str, tainted: bool = False) -> ToolTurn:
        """One user turn with tools, without the events (tests and benchmarks); the session keeps it."""
        history = self.session.messages + [{"role": "user", "content": text}]
        gen = self.events(history, tainted=tainted)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                outcome = stop.value
                break
        self.session.messages = history + outcome.added
        return outcome.turn

    def _call(self, name: str, args: dict, tainted: bool, seen: dict[str, str]) -> ToolCall:
        size = len(json.dumps(args, ensure_ascii=False))
        if size > ARGUMENT_CHARS:  # refused unread: not validated, not stored, not echoed back
            return ToolCall(name, {"(cut)": f"{size} characters"}, "error",
                            f"the arguments are {size} characters, over the limit of {ARGUMENT_CHARS}")
        key = json.dumps([name, args], sort_keys=True)
        if key in seen:
            return ToolCall(name, args, "repeated", f"Already called with these arguments; the result was: {seen[key]}")
        t = self.registry.get(name)
        if t is None:  # the grammar makes this unreachable, but never trust output
            return ToolCall(name, args, "error", f"there is no tool named {name!r}; the tools are {', '.join(self.registry.tools)}")
        import jsonschema

        try:
            jsonschema.validate(args, t.parameters)
        except jsonschema.ValidationError as exc:
            return ToolCall(name, args, "error", argument_error(exc))
        decision = self.policy.decide(t, tainted)
        if decision == "deny" or (decision == "ask" and not self.approve(t, args, tainted)):
            return ToolCall(name, args, "denied", "The user did not allow this call.")
        try:
            result = str(t.fn(**args))
            status = "ok"
        except Exception as exc:  # the model sees the error and can recover
            result, status = f"{type(exc).__name__}: {exc}", "error"
        result = clip(result, RESULT_CHARS)
        seen[key] = result
        return ToolCall(name, args, status, result)
