"""The shape of one tool step: what the model is told (the instructions), what it may write
(the output schema its grammar is built from: a call of one tool, or the answer), and how a
reasoning model's trace comes first. The loop that runs the steps is tools.calling.ToolLoop."""
from __future__ import annotations

import re

from .schema import Tool

NO_TOOL = "none"


def instructions(tools: list[Tool], listed: bool = True) -> str:
    """The system text that explains the call format (and, unless the template shows the
    tools itself, lists them)."""
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
    # One worked exchange: small models follow an example far better than a rule.
    lines += [
        "Example:",
        "User: What is 12 * 7?",
        'You: {"tool": "calculator", "arguments": {"expression": "12 * 7"}}',
        "User: Tool result (calculator, ok):\n84",
        f'You: {{"tool": "{NO_TOOL}", "answer": "12 * 7 = 84."}}',
    ]
    return "\n".join(lines)


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


def uses_tool_role(template, tools) -> bool:
    """Results go back as role "tool" only where the template renders tools itself and knows
    that role: a generic template would render the unknown role, but the model was never
    trained to read it."""
    return bool(tools) and bool(getattr(template, "native_tools", False)) and bool(getattr(template, "tool_role", False))


def after_thinking(gbnf: str) -> str:
    """A GBNF grammar that lets a reasoning trace (ended by </think>) come before `gbnf`'s root."""
    body = re.sub(r"^root ::=", "tool-step ::=", gbnf, count=1, flags=re.M)
    return 'root ::= think-text "</think>" [ \n]* tool-step\nthink-text ::= ([^<] | "<" [^/])*\n' + body
