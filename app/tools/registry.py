"""Where tools come from: the `crofter.tools` entry-point group and the user's tools folder.

A provider is a callable `provide(ctx: ToolContext) -> list[Tool]`. Packages
declare it as an entry point::

    [project.entry-points."crofter.tools"]
    mytools = "mypackage.tools:provide"

and a file in ``<data dir>/tools/*.py`` defines a `provide(ctx)` function the same
way. A provider that fails to load is reported in `problems` and skipped; it never
stops the chat. MCP servers named in ``<data dir>/mcp.toml`` add their tools too (app/tools/mcp.py).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from .schema import Tool

GROUP = "crofter.tools"


@dataclass
class ToolContext:
    """What providers may use: the folders file tools may read, and (when document
    collections are attached) `search(query, k) -> list[rag.retrieve.Hit]`."""

    roots: list[str] = field(default_factory=list)
    search: Callable[[str, int], list] | None = None


class ToolRegistry:
    """Named tools; a second tool with a taken name is refused, not silently shadowing."""

    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}
        self.problems: list[str] = []

    def register(self, t: Tool, origin: str = "") -> None:
        if t.name == "none":  # reserved: {"tool": "none"} is how the model answers
            self.problems.append(f"{origin or t.name}: the tool name 'none' is reserved; skipped")
            return
        if t.name in self.tools:
            self.problems.append(f"{origin or t.name}: a tool named {t.name!r} is already registered; skipped")
            return
        t.meta.setdefault("origin", origin)
        self.tools[t.name] = t

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name)

    def _add_from(self, provide, ctx: ToolContext, origin: str) -> None:
        try:
            for t in provide(ctx):
                if not isinstance(t, Tool):
                    raise TypeError(f"provider returned {type(t).__name__}, not Tool")
                self.register(t, origin)
        except Exception as exc:  # a broken plugin is reported, never fatal
            self.problems.append(f"{origin}: {type(exc).__name__}: {exc}")

    @classmethod
    def for_settings(cls, settings, search=None) -> "ToolRegistry":
        """The tools a turn gets: built-ins, packages, and the files in `<data dir>/tools`,
        with file access inside `tool_roots` and `search` for search_documents."""
        from models import paths

        from . import mcp

        reg = cls.discover(ToolContext(roots=settings.tool_roots, search=search), paths.data_dir() / "tools")
        config = paths.data_dir() / mcp.CONFIG
        if config.is_file():  # MCP servers' tools (app/tools/mcp.py): started once, reused by later turns
            tools, problems = mcp.provide_from(config, paths.data_dir() / "logs", set(reg.tools))
            for t in tools:
                reg.register(t, t.meta["origin"])
            reg.problems += problems
        return reg

    @classmethod
    def discover(cls, ctx: ToolContext, user_dir: Path | None = None) -> "ToolRegistry":
        """Every entry-point provider, then every provider file in `user_dir`."""
        reg = cls()
        for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name != "builtins", e.name)):
            try:
                provide = ep.load()
            except Exception as exc:
                reg.problems.append(f"entry point {ep.name}: {type(exc).__name__}: {exc}")
                continue
            reg._add_from(provide, ctx, f"entry point {ep.name}")
        if user_dir is not None and user_dir.is_dir():
            for path in sorted(user_dir.glob("*.py")):
                try:
                    spec = importlib.util.spec_from_file_location(f"crofter_user_tools.{path.stem}", path)
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
                    provide = module.provide
                except Exception as exc:
                    reg.problems.append(f"{path}: {type(exc).__name__}: {exc}")
                    continue
                reg._add_from(provide, ctx, str(path))
        return reg
