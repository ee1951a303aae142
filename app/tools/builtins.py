"""The built-in tools. They register through the `crofter.tools` entry point like any
third-party package's tools do (see pyproject.toml and registry.ToolRegistry)."""
from __future__ import annotations

import datetime
from typing import Annotated, Optional

from . import calc, files
from .registry import ToolContext
from .schema import Pattern, Tool, tool


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

    def search_documents(query: str, k: int = 5) -> str:
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
        """The one file the user named ("Read notes.txt") is answered by its text; a message
        naming two ("Read notes.txt and todo.txt") needs both read."""
        path = str(args.get("path", ""))
        known = files.names(ctx.roots) or [path]
        return files.named_in(message, path) and sum(files.named_in(message, n) for n in known) <= 1

    def lists_unnamed(args: dict, message: str) -> bool:
        """A listing answers a message that names no file ("What files do I have?"); one that
        names a file is about that file, and the listing is a step towards it."""
        known = files.names(ctx.roots)
        return known is not None and not any(files.named_in(message, n) for n in known)

    # The calculator's and the clock's results are the answer, and the file tools' when the user
    # asked for that file or listing; their paths are limited, turn by turn, to what exists.
    out = [tool(calculator, side_effects=False, answers=True), tool(current_time, side_effects=False, answers=True)]
    if ctx.roots:
        out += [tool(read_file, side_effects=False, private=True, answers=shows_named_file,
                     choices={"path": lambda: files.names(ctx.roots)}),
                tool(list_dir, side_effects=False, private=True, answers=lists_unnamed,
                     choices={"path": lambda: files.names(ctx.roots, folders=True)})]
    if ctx.search is not None:
        out.append(tool(search_documents, side_effects=False))
    return out
