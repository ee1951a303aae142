"""The shape of one tool step: what the model is told (the instructions, with examples built from
the tools' own schemas), what it may write (the output schema its grammar is built from: a call
of one tool, or the answer), how the first step's tool is chosen, and how a reasoning model's
trace comes first. The loop that runs the steps is tools.calling.ToolLoop.

Choosing the tool (`CHOICES`, measured by bench/bench_tools.py):

- "sample": the grammar holds every branch and the model writes the name as it decodes.
- "rank": each candidate's opening, `{"tool": "NAME"`, is scored by the model's own
  log-likelihood after the step's prompt (one prompt evaluation, then a few tokens per
  candidate through a token trie); the step is then generated under the winner's branch only.
- "channel": the other way round: each candidate scored by the log-likelihood of the user's
  message after a line saying what the candidate is for (its docstring, and the names a path
  argument may take this turn); then the winner's branch, as with "rank".
- "decide": a short separate step first, which names the tool (or "none") under a grammar of
  the names alone, then the arguments under that tool's branch.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace

from . import files
from .schema import Tool

NO_TOOL = "none"
CHOICES = ("sample", "rank", "channel", "decide")
EXAMPLES = ("none", "fixed", "generated")


def instructions(tools: list[Tool], listed: bool = True, examples: str = "generated") -> str:
    """The system text that explains the call format (and, unless the template shows the
    tools itself, lists them). `examples`: "generated" from the tools' own schemas and
    docstrings, "fixed" (one calculator exchange, what crofter shipped first) or "none"."""
    lines = [
        "You can use tools. Reply with exactly one JSON object.",
        f'To call a tool: {{"tool": "<name>", "arguments": {{...}}}}. To answer the user: {{"tool": "{NO_TOOL}", "answer": "<text>"}}.',
        "Call a tool when it helps (arithmetic, dates, files); after a tool result, answer using it.",
    ]
    if listed:
        lines.append("Tools:")
        for t in tools:
            params = ", ".join(f"{k}: {v.get('type', 'enum')}" for k, v in t.parameters["properties"].items())
            lines.append(f"- {t.name}({params}): {t.description}")
    else:
        lines.append(f"The tools are described above: {', '.join(t.name for t in tools)}.")
    if examples == "generated" and listed:
        lines += example_lines(tools)
    elif examples == "fixed" and any(t.name == "calculator" for t in tools):
        lines += ["Example:", "User: What is 12 * 7?", 'You: {"tool": "calculator", "arguments": {"expression": "12 * 7"}}',
                  "User: Tool result (calculator, ok):\n84", f'You: {{"tool": "{NO_TOOL}", "answer": "12 * 7 = 84."}}']
    return "\n".join(lines)


def _example_value(name: str, schema: dict, description: str, default):
    """An argument value for an example call: the schema's first choice, a quoted value from the
    parameter's (or tool's) docstring ('e.g. "12 * 7"', 'such as "Europe/Paris"'), the default."""
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    quoted = re.findall(r'"([^"\\]{1,60})"', schema.get("description", "") + " " + description)
    if kind == "string" and quoted:
        return quoted[0]
    if default is not None:
        return default
    return {"integer": 1, "number": 1.5, "boolean": True, "array": []}.get(kind, f"<{name}>")


def example_lines(tools: list[Tool], limit: int = 6) -> list[str]:
    """One call per tool, with arguments taken from its own schema and docstring, and the answer
    shape: generic, so it fits whatever tools are registered (never a benchmark's prompts)."""
    out = ["Examples of replies:"]
    for t in tools[:limit]:
        props = t.parameters.get("properties", {})
        required = set(t.parameters.get("required", []))
        defaults = t.meta.get("defaults", {})
        args = {k: _example_value(k, s, t.description, defaults.get(k)) for k, s in props.items()
                if k in required or s.get("enum") or re.search(r'"[^"]+"', s.get("description", ""))}
        purpose = re.split(r"\.\s|\.$|, e\.g\.|, such as| \(", t.description)[0].strip()
        purpose = purpose[:1].lower() + purpose[1:]
        out.append(f'{json.dumps({"tool": t.name, "arguments": args})}  (to {purpose})')
    out.append(f'{{"tool": "{NO_TOOL}", "answer": "Hello! How can I help?"}}  (no tool is needed: greetings, general questions)')
    out.append(f'After "Tool result (<tool>, ok): <result>", answer with the result: {{"tool": "{NO_TOOL}", "answer": "..."}}')
    return out


def output_schema(tools: list[Tool], allow_calls: bool = True, allow_answer: bool = True) -> dict:
    # Every object starts with "tool", so the model's first choice is a tool name
    # (or "none" to answer): small models pick among names far better than they
    # decide between differently shaped objects.
    answer = {"type": "object", "properties": {"tool": {"const": NO_TOOL}, "answer": {"type": "string"}},
              "required": ["tool", "answer"]}
    if not allow_calls or not tools:
        return answer
    calls = [call_schema(t) for t in tools]
    if not allow_answer:  # a call is required (an API client's tool_choice "required" or a named tool)
        return calls[0] if len(calls) == 1 else {"oneOf": calls}
    return {"oneOf": [*calls, answer]}


def call_schema(t: Tool) -> dict:
    """The branch of the tool-step grammar that is a call of `t`."""
    return {"type": "object", "properties": {"tool": {"const": t.name}, "arguments": t.parameters},
            "required": ["tool", "arguments"]}


_CHAR = r'char ::= [^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


def stated_answer_gbnf(result: str, more: bool = False) -> str:
    """GBNF for an answer object that states `result` (a tool whose result is the answer):
    `{"tool": "none", "answer": "<result>"}`; with `more`, the model's own words may follow it
    (measured: the 135M model then mostly wrote a stray ` }` and a sentence that contradicted it)."""
    body = json.dumps(result, ensure_ascii=False)[1:-1]  # as it stands inside a JSON string
    literal = body.replace("\\", "\\\\").replace('"', '\\"')
    rest = " char*" if more else ""
    return ('root ::= "{" space "\\"tool\\"" space ":" space "\\"none\\"" space "," space "\\"answer\\"" space ":" '
            f'space "\\"" "{literal}"{rest} "\\"" space "}}" space\n{_CHAR}\nspace ::= " "?\n')


def mentioned(tool: Tool, text: str) -> Tool:
    """`tool` with each enum parameter (a turn's listing) limited to the values the user's
    message names, when it names some: "What is in todo.txt?" can then only read todo.txt."""
    params, changed = tool.parameters, False
    for pname, s in tool.parameters.get("properties", {}).items():
        values = [v for v in s.get("enum", []) if isinstance(v, str) and len(v) >= 3]
        named = [v for v in values if files.named_in(text, v)]
        if named and len(named) < len(s["enum"]):
            if not changed:
                params, changed = json.loads(json.dumps(params)), True
            params["properties"][pname] = {**s, "enum": named}
    if not changed:
        return tool
    return replace(tool, parameters=params)


def states(answer: str, result: str) -> bool:
    """Whether `answer` states `result`: the text itself, or (a number) the same value."""
    result = result.strip()
    if result and result in answer:
        return True
    try:
        want = float(result)
    except ValueError:
        return False
    for m in re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", answer, re.I):
        try:
            if math.isclose(float(m.replace(",", "")), want, rel_tol=1e-9, abs_tol=1e-9):
                return True
        except ValueError:
            continue
    return False


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n[... cut at {limit} characters]"


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def not_a_call(raw: str) -> str:
    """Why a reply that started like JSON is not one call or answer object."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        why = f"not valid JSON ({exc.msg} at character {exc.pos})"
    else:
        why = ("a list: make one call per reply" if isinstance(obj, list)
               else 'an object without "tool"' if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object")
    return (f'your reply was {why}. Reply with exactly one object: {{"tool": "<name>", "arguments": {{...}}}} '
            f'or {{"tool": "{NO_TOOL}", "answer": "<text>"}}.')


def argument_error(exc) -> str:
    """A jsonschema error as one line naming the parameter, never echoing a long value."""
    where = ".".join(str(p) for p in exc.absolute_path)
    if not where:
        return f"invalid arguments: {clip(exc.message, 200)}"
    if exc.instance == "" and isinstance(exc.schema, dict) and exc.schema.get("minLength", 0) >= 1:
        return f"invalid argument {where!r}: must not be empty"
    if exc.validator == "pattern":
        return f"invalid argument {where!r}: {short(exc.instance)} does not match the pattern {exc.validator_value}"
    return f"invalid argument {where!r}: {clip(exc.message, 200)}"


def partial_answer(raw: str) -> str:
    """The text of an answer object cut off by max_tokens (or the raw output if it was a call)."""
    m = re.match(r'\s*\{\s*"tool"\s*:\s*"none"\s*,\s*"answer"\s*:\s*"(.*)', raw, re.S)
    if not m:
        return raw
    body = m.group(1)
    for end in range(len(body), max(len(body) - 6, -1), -1):  # drop a half-written escape
        try:
            return json.loads('"' + body[:end] + '"')
        except json.JSONDecodeError:
            continue
    return body


def uses_tool_role(template, tools) -> bool:
    """Results go back as role "tool" only where the template renders tools itself and knows
    that role: a generic template would render the unknown role, but the model was never
    trained to read it."""
    return bool(tools) and bool(getattr(template, "native_tools", False)) and bool(getattr(template, "tool_role", False))


def after_thinking(gbnf: str) -> str:
    """A GBNF grammar that lets a reasoning trace (ended by </think>) come before `gbnf`'s root."""
    body = re.sub(r"^root ::=", "tool-step ::=", gbnf, count=1, flags=re.M)
    return 'root ::= think-text "</think>" [ \n]* tool-step\nthink-text ::= ([^<] | "<" [^/])*\n' + body


def opening(name: str) -> str:
    """How a step that picks `name` begins (the shape the instructions and examples show)."""
    return '{"tool": "' + name + '"'


def _log_softmax(logits):
    import numpy as np

    m = float(logits.max())
    return logits - m - math.log(float(np.exp(logits - m).sum()))


def continuation_logprobs(llm, prompt: list[int], continuations: list[list[int]]) -> list[float]:
    """log P(continuation | prompt) for each, with a `llama_cpp.Llama` (on its own thread).

    The prompt is evaluated once (reusing the KV cache's common prefix, as Llama.generate does);
    each continuation's tokens are then fed one at a time through a trie, so shared openings
    (`{"tool": "`) are evaluated once. Afterwards the cache holds the prompt less its last token,
    so the next generation re-evaluates that token and samples from fresh logits."""
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()

    def last_logprobs():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return _log_softmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64))

    held = list(llm.input_ids[: llm.n_tokens])
    keep = 0
    for a, b in zip(held, prompt[:-1]):  # at least the last prompt token is evaluated: its logits are needed
        if a != b:
            break
        keep += 1
    llm.n_tokens = keep
    llm.eval(prompt[keep:])
    rows = {(): last_logprobs()}  # continuation prefix -> log-probabilities of the next token
    fed: list[int] = []  # continuation tokens in the cache after the prompt
    scores = []
    for cont in continuations:
        total = 0.0
        for i, tok in enumerate(cont):
            key = tuple(cont[:i])
            if key not in rows:
                j = 0
                while j < min(len(fed), i) and fed[j] == cont[j]:
                    j += 1
                llm.n_tokens = len(prompt) + j
                fed = fed[:j]
                for t in cont[j:i]:
                    llm.eval([t])
                    fed.append(t)
                    rows.setdefault(tuple(fed), last_logprobs())
            total += float(rows[key][tok])
        scores.append(total)
    llm.n_tokens = len(prompt) - 1
    return scores


def scored_tails(llm, sequences: list[tuple[list[int], int]]) -> list[float]:
    """For each (tokens, start): log P(tokens[start:] | tokens[:start]), each sequence decoded
    fresh in one batch with logits at the positions scored (llama.cpp's C batch API; Llama's
    own eval keeps only the last token's). The KV cache is emptied afterwards, and the Llama told
    so: its next generation evaluates its whole prompt."""
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()
    out = []
    for tokens, start in sequences:
        n = len(tokens)
        if not 1 <= start < n or n > llm.n_batch:
            raise ValueError(f"cannot score tokens[{start}:] of {n} (batch {llm.n_batch})")
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i >= start - 1
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), -1, 0, -1)
            llm.n_tokens = 0
            if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed while scoring")
            total = 0.0
            for i in range(start - 1, n - 1):
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(n_vocab,)).astype(np.float64)
                total += float(_log_softmax(row)[tokens[i + 1]])
            out.append(total)
        finally:
            llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), -1, 0, -1)
    llm.n_tokens = 0
    return out


def channel_prefix(t: Tool | None) -> str:
    """What a tool is for, written so the user's message can follow it (the "channel" ranking:
    how likely is this message, given that it needs this tool)."""
    if t is None:
        return "No tool: small talk, greetings, and questions of general knowledge.\nA message that needs no tool:\n"
    desc = t.description
    for pname, s in t.parameters.get("properties", {}).items():
        if s.get("enum"):
            desc += f" ({pname}: {', '.join(map(str, s['enum'][:8]))})"
    return f"Tool {t.name}: {desc}\nA message that needs the {t.name} tool:\n"


def rank_channel(engine, tools: list[Tool], question: str, allow_answer: bool = True) -> list[tuple[str, float]]:
    """Candidates ranked by log P(the user's message | what the candidate is for): the message's
    own prior likelihood is the same under every candidate, so the scores compare fairly (the
    noisy-channel classifier of Min et al. 2022, arXiv:2108.04106)."""
    llm = engine.llm
    tok = lambda text, bos=False: llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False)  # noqa: E731
    q = tok(question.strip()[:2000])
    cands = [(t.name, t) for t in tools] + ([(NO_TOOL, None)] if allow_answer else [])
    seqs = []
    for _, t in cands:
        head = tok(channel_prefix(t), bos=True)
        seqs.append((head + q[: max(1, llm.n_batch - len(head))], len(head)))
    scores = on_worker(engine, lambda: scored_tails(llm, seqs))
    return sorted(((name, sc) for (name, _), sc in zip(cands, scores)), key=lambda p: -p[1])


def on_worker(engine, fn):
    """fn() on the engine's worker thread, after any generation in flight (Engine.call)."""
    return engine.call(fn)


def can_rank(engine) -> bool:
    """A local llama.cpp engine (a remote endpoint gives no log-likelihoods)."""
    return getattr(engine, "llm", None) is not None and hasattr(engine, "call")


def rank(engine, prompt_tokens: list[int], names: list[str]) -> list[tuple[str, float]]:
    """`names` with the log-likelihood of each one's opening after the prompt, best first."""
    llm = engine.llm
    conts = [llm.tokenize(opening(n).encode("utf-8"), add_bos=False, special=False) for n in names]
    scores = on_worker(engine, lambda: continuation_logprobs(llm, list(prompt_tokens), conts))
    return sorted(zip(names, scores), key=lambda p: -p[1])


def decision_messages(tools: list[Tool], question: str, allow_answer: bool = True) -> list[dict]:
    """The short decision step: which tool (or none) the user's message needs."""
    lines = ["Which tool does the user's message need? Reply with its name only."]
    lines += [f"- {t.name}: {t.description}" for t in tools]
    if allow_answer:
        lines.append(f"- {NO_TOOL}: no tool; greetings, opinions and general knowledge are answered directly")
    return [{"role": "system", "content": "\n".join(lines)}, {"role": "user", "content": question}]


def decide_name(engine, sampling, tools: list[Tool], question: str, allow_answer: bool, make_grammar) -> str | None:
    """The decision step: a greedy generation of one name under a grammar of the names alone.
    `make_grammar(schema)` builds the grammar (the loop's, which knows a reasoning template)."""
    schema = {"enum": [t.name for t in tools] + ([NO_TOOL] if allow_answer else [])}
    step = replace(sampling, grammar=make_grammar(schema), json_schema=schema, max_tokens=16, temperature=0.0,
                   repeat_penalty=1.0)
    prompt = engine.tokenize_chat(decision_messages(tools, question, allow_answer))
    raw = "".join(ev.text for ev in engine.stream(prompt, step) if ev.text)
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None
