"""Tools from MCP servers, through the official `mcp` SDK, over stdio.

`<data dir>/mcp.toml` names the servers, in the shape other MCP clients use::

    [servers.notes]
    command = "python"
    args = ["-m", "notes_server"]
    env = { NOTES_DIR = "/home/me/notes" }
    read_only = ["search_notes"]     # tools you trust not to change anything (default: none)
    timeout = 30                     # seconds a start or a call may take (default 30)

Each server's tools join the registry with the JSON schema the server gives. Every MCP tool is
side-effecting (asked before it runs) unless listed in `read_only`; what it returns is data the
model reads, never instructions (the tool loop taints the turn after any result). A server that
fails to start is reported in the registry's problems; one that dies mid-call makes that call an
error the model sees, and is started again the next time tools are gathered. Servers stay running
between turns (one process each) and are stopped when crofter exits.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .schema import Tool

CONFIG = "mcp.toml"
SERVER_KEYS = {"command", "args", "env", "read_only", "timeout", "cwd"}


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    read_only: tuple[str, ...] = ()
    timeout: float = 30.0
    cwd: str | None = None


def load_specs(path: Path) -> tuple[list[ServerSpec], list[str]]:
    """The servers in `path` and the problems found (each names the file and the key); a missing file is no servers."""
    import tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [], [f"{path}: not readable TOML ({exc}); no MCP servers started"]
    problems, specs = [], []
    servers = raw.get("servers", {})
    extra = sorted(set(raw) - {"servers"})
    if extra:
        problems.append(f"{path}: unknown key {extra[0]!r} (servers go under [servers.NAME])")
    if not isinstance(servers, dict):
        return [], problems + [f"{path}: servers: expected tables [servers.NAME]"]
    for name, cfg in servers.items():
        where = f"{path}: servers.{name}"
        try:
            specs.append(_spec(name, cfg, where))
        except ValueError as exc:
            problems.append(f"{where}: {exc}; skipped")
    return specs, problems


def _spec(name: str, cfg, where: str) -> ServerSpec:
    if not isinstance(cfg, dict):
        raise ValueError("expected a table with command = ...")
    unknown = sorted(set(cfg) - SERVER_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(SERVER_KEYS))})")
    command = cfg.get("command")
    if not isinstance(command, str) or not command:
        raise ValueError("command: missing (the program that starts the server)")
    args, read_only = cfg.get("args", []), cfg.get("read_only", [])
    for key, value in (("args", args), ("read_only", read_only)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key}: expected a list of strings")
    env = cfg.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ValueError("env: expected a table of strings")
    timeout = cfg.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    cwd = cfg.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ValueError("cwd: expected a folder path")
    return ServerSpec(name, command, tuple(args), tuple(sorted(env.items())), tuple(read_only), float(timeout), cwd)


class ServerGone(RuntimeError):
    pass


class Connection:
    """One running server: an asyncio loop in a daemon thread holds its stdio session."""

    def __init__(self, spec: ServerSpec, log: Path | None = None):
        self.spec, self.log = spec, log
        self.listed: list = []
        self.error: BaseException | None = None
        self.dead = False
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._session = None
        self._thread = threading.Thread(target=self._run, name=f"mcp-{spec.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(spec.timeout + 5) and self.error is None:
            self.error = TimeoutError(f"no answer within {spec.timeout:g} s")
            self.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - anything the SDK raises ends this server, reported
            self.error = self.error or exc
        finally:
            self.dead = True
            self._ready.set()

    async def _main(self) -> None:
        from contextlib import AsyncExitStack

        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        s = self.spec
        params = StdioServerParameters(command=s.command, args=list(s.args), env=dict(s.env) or None, cwd=s.cwd)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        errlog = open(self.log, "a", encoding="utf-8") if self.log else None  # noqa: SIM115 - closed below
        try:
            async with AsyncExitStack() as stack:
                kw = {"errlog": errlog} if errlog else {}
                read, write = await stack.enter_async_context(stdio_client(params, **kw))
                session = await stack.enter_async_context(ClientSession(read, write))
                await asyncio.wait_for(session.initialize(), s.timeout)
                self.listed = list((await asyncio.wait_for(session.list_tools(), s.timeout)).tools)
                self._session = session
                self._ready.set()
                await self._stop.wait()
        finally:
            if errlog:
                errlog.close()

    def call(self, name: str, arguments: dict) -> str:
        if self.dead or self._session is None or self._loop is None:
            raise ServerGone(f"MCP server {self.spec.name!r} is not running ({_why(self.error)})")
        fut = asyncio.run_coroutine_threadsafe(self._session.call_tool(name, arguments), self._loop)
        try:
            result = fut.result(self.spec.timeout)
        except TimeoutError:
            fut.cancel()
            raise ServerGone(f"MCP server {self.spec.name!r} did not answer within {self.spec.timeout:g} s") from None
        except Exception as exc:  # the connection closed under the call: the server died
            self.dead = True
            raise ServerGone(f"MCP server {self.spec.name!r} stopped during the call ({_why(exc)})") from None
        text = result_text(result)
        if getattr(result, "is_error", None) or getattr(result, "isError", None):
            raise RuntimeError(text or "the tool reported an error")
        return text

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and not self.dead:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)


def _why(exc: BaseException | None) -> str:
    if exc is None:
        return "it exited"
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def result_text(result) -> str:
    """The text of a CallToolResult: its text parts, other parts named, structured content as JSON."""
    parts = []
    for c in getattr(result, "content", None) or []:
        kind = getattr(c, "type", "")
        if kind == "text":
            parts.append(c.text)
        else:
            parts.append(f"[{kind or 'content'}{': ' + c.mime_type if getattr(c, 'mime_type', None) else ''}]")
    structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False))
    return "\n".join(parts)


_POOL: dict[ServerSpec, Connection] = {}
_POOL_LOCK = threading.Lock()


def connection(spec: ServerSpec, log: Path | None) -> Connection:
    """The running connection for `spec`, started (again) when there is none or it died."""
    with _POOL_LOCK:
        conn = _POOL.get(spec)
        if conn is None or conn.dead:
            conn = _POOL[spec] = Connection(spec, log)
        return conn


@atexit.register
def close_all() -> None:
    with _POOL_LOCK:
        conns = list(_POOL.values())
        _POOL.clear()
    for c in conns:
        c.close()


def _tool_name(raw: str, taken: set[str], server: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", raw)[:64] or "tool"
    if not re.match(r"[a-zA-Z_]", name):
        name = f"t_{name}"[:64]
    if name in taken or name == "none":
        name = f"{re.sub(r'[^a-zA-Z0-9_]', '_', server)}_{name}"[:64]
    return name


def _grammar_ok(schema: dict) -> str | None:
    """None when llama.cpp can build a grammar for `schema` (else the tool would break every tool step)."""
    try:
        from llama_cpp import LlamaGrammar

        LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return None
    except Exception as exc:  # noqa: BLE001
        return _why(exc)


def provide_from(config: Path, log_dir: Path | None, taken: set[str]) -> tuple[list[Tool], list[str]]:
    """Every tool of every server in `config` (servers started or reused), and the problems met."""
    specs, problems = load_specs(config)
    tools: list[Tool] = []
    for spec in specs:
        log = log_dir / f"mcp-{spec.name}.log" if log_dir else None
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        conn = connection(spec, log)
        if conn.error is not None or conn.dead:
            problems.append(f"{config}: servers.{spec.name}: did not start ({_why(conn.error)})"
                            + (f"; its output is in {log}" if log else ""))
            continue
        for t in conn.listed:
            schema = dict(getattr(t, "input_schema", None) or getattr(t, "inputSchema", None) or {})
            schema.setdefault("type", "object")
            schema.setdefault("properties", {})
            bad = _grammar_ok(schema)
            if bad:
                problems.append(f"{config}: servers.{spec.name}: tool {t.name!r}: its input schema cannot be "
                                f"turned into a grammar ({bad}); skipped")
                continue
            name = _tool_name(t.name, taken, spec.name)
            taken.add(name)
            desc = (t.description or getattr(t, "title", None) or f"the {t.name} tool of MCP server {spec.name}").strip()
            tools.append(Tool(name, " ".join(desc.split()), schema, _caller(conn, t.name),
                              side_effects=t.name not in spec.read_only,
                              meta={"origin": f"mcp server {spec.name}", "mcp_server": spec.name, "mcp_tool": t.name}))
    return tools, problems


def _caller(conn: Connection, tool_name: str):
    def call(**arguments):
        return conn.call(tool_name, arguments)

    return call
