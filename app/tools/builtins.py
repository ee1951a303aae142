"""The built-in tools. They register through the `crofter.tools` entry point like any
third-party package's tools do (see pyproject.toml and registry.ToolRegistry)."""
from __future__ import annotations

import datetime
import os
from typing import Annotated, Optional

from . import calc, files
from .registry import ToolContext
from .schema import Pattern, Range, Tool, tool


def provide(ctx: ToolContext) -> list[Tool]:
    """Built-ins for this context; the file tools only when roots are configured."""

    def calculator(expression: Annotated[str, Pattern(calc.PATTERN)]) -> str:
        """Compute arithmetic exactly (sums, differences, products, quotients, powers, roots), e.g. "12.5 * (3 + 4) / 2" or "sqrt(2) ** 3".

        Args:
            expression: numbers, + - * / // % **, parentheses, and sqrt log log10 exp sin cos tan abs round floor ceil min max pi e
        """
        return str(calc.calculate(expression))

    def current_time(timezone: Optional[str] = None) -> str:
        """The current date and time (today's date, the day, month and year, the time of day), in ISO 8601.

        Args:
            timezone: an IANA zone such as "Europe/Paris"; the machine's local time when omitted
        """
        if timezone:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                zone = ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown timezone {timezone!r}") from None
            return datetime.datetime.now(zone).isoformat(timespec="seconds")
        return datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    def read_file(path: str) -> str:
        """Read a text file from the folders the user allowed.

        Args:
            path: a path inside an allowed folder (relative paths start at the first one)
        """
        return files.read_text(ctx.roots, path)

    def list_dir(path: str = ".") -> str:
        """List the files in a folder inside the folders the user allowed (sub-folders end with /).

        Args:
            path: a folder inside an allowed folder (relative paths start at the first one)
        """
        return "\n".join(files.list_entries(ctx.roots, path)) or "(empty)"

    def search_documents(query: str, k: Annotated[int, Range(1, 10)] = 5) -> str:
        """Search the user's document collections attached to this chat; returns numbered passages with their source.

        Args:
            query: what to look for, in words that would appear in the passage
            k: how many passages (1-10)
        """
        hits = ctx.search(query, max(1, min(int(k), 10)))
        if not hits:
            return "No passage matched."
        return "\n\n".join(f"[{i}] {h.where()}\n{h.text.strip()}" for i, h in enumerate(hits, 1))

    def shows_named_file(args: dict, message: str) -> bool:
        """A plain request for the one file the message names ("Read notes.txt", "What is in
        todo.txt?") is answered by its text; "Summarise notes.txt", a second file to read or
        another tool to use is not (the model goes on)."""
        path = str(args.get("path", ""))
        known = files.names(ctx.roots) or [path]
        return (files.named_in(message, path) and sum(files.named_in(message, n) for n in known) <= 1
                and files.asks_for(message, files.READ_WORDS) and not files.asks_for(message, files.OTHER_WORDS))

    def lists_asked_folder(args: dict, message: str) -> bool:
        """A request for a listing ("What files do I have?", "List the folder") that names no
        file is answered by the listing of the folder it names (the first root if none)."""
        known, folders = files.names(ctx.roots), files.names(ctx.roots, folders=True) or ["."]
        named = [f for f in folders if f != "." and files.named_in(message, f)]
        return (known is not None and not any(files.named_in(message, n) for n in known)
                and files.asks_for(message, files.LIST_WORDS) and not files.asks_for(message, files.OTHER_WORDS)
                and (os.path.normpath(str(args.get("path", "."))) in [os.path.normpath(f) for f in named or ["."]]))

    # The calculator's and the clock's results are the answer, and the file tools' when the user
    # asked for that file or listing; their paths are limited, turn by turn, to what exists.
    out = [tool(calculator, side_effects=False, answers=True), tool(current_time, side_effects=False, answers=True)]
    if ctx.roots:
        out += [tool(read_file, side_effects=False, private=True, answers=shows_named_file,
                     choices={"path": lambda: files.names(ctx.roots)}),
                tool(list_dir, side_effects=False, private=True, answers=lists_asked_folder,
                     choices={"path": lambda: files.names(ctx.roots, folders=True)})]
    if ctx.search is not None:
        out.append(tool(search_documents, side_effects=False))
    return out
