"""Visible text of an HTML page, from a stream of parser events (no tree is built).

Memory follows the text, not the markup: a 50 MB page costs about its text's size, where
a BeautifulSoup tree costs over ten times the page and, at 50 MB, over a minute to build. Scripts, styles, the head,
comments and doctypes are dropped; h1-h6 give heading marks; ``pre`` keeps its whitespace.

>>> html_text("<h1>Guide</h1><p>Hello   world</p>")
('\\nGuide\\n\\nHello world\\n', [(1, 1, 'Guide')])
"""
from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Callable

BLOCK_CHARS = 256 * 1024  # fed to the parser at a time; `check` runs in between

_HTML_SKIP = {"script", "style", "noscript", "template", "head", "title"}
_HTML_BLOCKS = {"p", "div", "li", "tr", "br", "pre", "section", "article", "table", "ul", "ol", "dd", "dt",
                "blockquote", "body"}
_HTML_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _HtmlText(HTMLParser):
    """Comments, doctypes and processing instructions never reach `handle_data`; `head` ends at
    `<body>` even when `</head>` is missing."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.marks: list[tuple[int, int, str]] = []
        self.size = 0
        self.skip: list[str] = []  # open elements whose content is dropped
        self.pre = 0
        self.heading: tuple[int, list[str]] | None = None  # (level, pieces) while inside <hN>

    def emit(self, s: str) -> None:
        self.parts.append(s)
        self.size += len(s)

    def newline(self) -> None:
        if self.parts and not self.parts[-1].endswith("\n"):
            self.emit("\n")

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "body" and "head" in self.skip:
            self.skip.clear()
        if tag in _HTML_SKIP and tag not in _HTML_VOID:
            self.skip.append(tag)
        elif not self.skip and re.fullmatch(r"h[1-6]", tag):
            self.heading = (int(tag[1]), [])
        elif tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag) -> None:
        if self.skip:
            if tag in self.skip:
                del self.skip[self.skip.index(tag):]
            return
        if self.heading is not None and re.fullmatch(r"h[1-6]", tag):
            level, pieces = self.heading
            self.heading = None
            title = re.sub(r"\s+", " ", "".join(pieces)).strip()
            self.newline()
            self.emit("\n")
            self.marks.append((self.size, level, title))
            self.emit(title + "\n\n")
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _HTML_BLOCKS:
            self.newline()

    def handle_data(self, data) -> None:
        if self.skip:
            return
        if self.heading is not None:
            self.heading[1].append(data)
        elif self.pre:
            self.emit(data)
        elif data.strip():
            self.emit(re.sub(r"\s+", " ", data))


def html_text(source: str, check: Callable[[int, int], None] | None = None) -> tuple[str, list[tuple[int, int, str]]]:
    """(text, heading marks as (offset, level, title)); `check(chars fed, text size)` runs after
    every block and may raise to stop the parse (the caller's time and size caps)."""
    parser = _HtmlText()
    for i in range(0, len(source), BLOCK_CHARS):
        parser.feed(source[i:i + BLOCK_CHARS])
        if check is not None:
            check(min(i + BLOCK_CHARS, len(source)), parser.size)
    parser.close()
    return "".join(parser.parts), parser.marks
