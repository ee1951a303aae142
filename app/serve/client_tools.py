"""The client's functions as tools: the turn constrains the model to them, the client runs them.

A tool in an OpenAI request is a name, a description and a JSON schema, with no Python
behind it: here it becomes a `tools.schema.Tool` whose function refuses to run (the turn
runs with `TurnTools(defer=True)`, so it never is) and the call goes back to the client as
OpenAI `tool_calls`.

`tool_choice` "required" or a named function must produce a call: `TurnTools(require=True)`
drops the answer branch from the loop's first grammar (a named function: a registry of that one).
"""
from __future__ import annotations

import json
import secrets
import threading

from .errors import ApiError


def _not_here(**_):
    raise RuntimeError("a client tool runs on the client")


def registry_for(specs, only: str | None = None):
    """A ToolRegistry of the request's function specs (`only`: just that one); a schema the
    grammar cannot express is a 400 naming the tool."""
    from llama_cpp import LlamaGrammar

    from ..tools.calling import call_schema
    from ..tools.registry import ToolRegistry
    from ..tools.schema import Tool

    reg = ToolRegistry()
    for i, spec in enumerate(specs):
        f = spec.function
        if only is not None and f.name != only:
            continue
        params = dict(f.parameters or {})
        if params.get("type", "object") != "object":
            raise ApiError(400, f"tools.{i}.function.parameters: must be a JSON schema of type object", f"tools.{i}.function.parameters")
        params.setdefault("type", "object")
        if not isinstance(params.get("properties", {}), dict):
            raise ApiError(400, f"tools.{i}.function.parameters.properties: must be an object", f"tools.{i}.function.parameters")
        params.setdefault("properties", {})
        t = Tool(f.name, f.description or f.name, params, _not_here, side_effects=True)
        try:
            LlamaGrammar.from_json_schema(json.dumps(call_schema(t)), verbose=False)
        except Exception as exc:  # the converter's own message names the construct
            raise ApiError(400, f"tools.{i}.function.parameters: cannot be turned into a grammar ({exc})",
                           f"tools.{i}.function.parameters") from None
        reg.register(t, "client")
        if reg.problems:
            raise ApiError(400, f"tools.{i}.function.name: {reg.problems[-1]}", f"tools.{i}.function.name")
    if only is not None and only not in reg.tools:
        raise ApiError(400, f"tool_choice: no tool named {only!r} in tools", "tool_choice")
    return reg


def choice_of(tool_choice) -> tuple[str, str | None]:
    """("none" | "auto" | "required", the named function or None)."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        return tool_choice, None
    name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
    if not isinstance(name, str) or not name:
        raise ApiError(400, 'tool_choice: expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                       "tool_choice")
    return "named", name


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def openai_calls(calls) -> list[dict]:
    """Requested `ToolCall`s as OpenAI `tool_calls` (arguments are a JSON string)."""
    return [{"id": call_id(), "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in calls]


# -- crofter's own tools, run by the server (`crofter.tools`) --------------------------------------
def _unknown(name: str, have) -> ApiError:
    return ApiError(400, f"crofter.tools: no tool named {name!r} on this server "
                         f"(it has: {', '.join(sorted(have)) or 'none'})", "crofter.tools")


class ToolNames:
    """The names of the crofter tools the server's settings provide, so that a request naming
    one that does not exist is refused before it waits in its model's line. Discovered on first
    use (on a worker thread: it may start MCP servers), and again only when a file in
    `<data dir>/tools` or `mcp.toml` changes."""

    def __init__(self, settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._seen: tuple | None = None
        self._names: frozenset = frozenset()

    @staticmethod
    def signature() -> tuple:
        from models import paths

        from ..tools import mcp

        files = sorted((paths.data_dir() / "tools").glob("*.py")) + [paths.data_dir() / mcp.CONFIG]
        out = []
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            out.append((f.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def names(self, fresh: bool = False) -> frozenset:
        """Every tool name (search_documents aside: it exists when a request attaches collections);
        `fresh`: discover again even if nothing changed (an MCP server may have come back)."""
        from ..tools.registry import ToolRegistry

        with self._lock:
            sig = self.signature()
            if fresh or sig != self._seen:
                self._names = frozenset(ToolRegistry.for_settings(self.settings).tools)
                self._seen = sig
            return self._names

    def check(self, names: list[str]) -> None:
        """Raise the 400 for the first of `names` this server does not have."""
        have = self.names()
        if any(n != "search_documents" and n not in have for n in names):
            have = self.names(fresh=True)  # once more before refusing: a server down at the last look
        for n in names:
            if n != "search_documents" and n not in have:
                raise _unknown(n, have)


def builtin_registry(settings, names: list[str], search=None):
    """A ToolRegistry of the crofter tools a request names (`crofter.tools`), from what the
    server's settings provide (built-ins, plugins, MCP servers); an unknown name is a 400
    listing the ones there are (`ToolNames.check` has refused most before the request queued;
    this catches a tool that went away since). Runs on the job thread."""
    from ..tools.registry import ToolRegistry

    every = ToolRegistry.for_settings(settings, search)
    unknown = [n for n in names if n not in every.tools]
    if unknown:
        raise _unknown(unknown[0], every.tools)
    reg = ToolRegistry()
    for n in dict.fromkeys(names):
        reg.register(every.tools[n], every.tools[n].meta.get("origin", ""))
    return reg


def serve_policy(registry, allowed: list[str]):
    """The policy of tools run for a request (nobody is there to be asked): the ones the server
    was started with `--allow-tool` run; the others that touch the user's files or the world
    are denied; the rest (calculator, clock, document search) run as the default policy says."""
    from ..tools.policy import Policy

    rules = {name: "allow" if name in allowed else "deny" for name, t in registry.tools.items()
             if name in allowed or t.private or t.side_effects}
    return Policy(rules)


def call_record(call) -> dict:
    """A call crofter ran (a `tools.calling.ToolCall`) as the response's `crofter.calls` entry."""
    return {"name": call.name, "arguments": call.arguments, "status": call.status, "result": call.result}
