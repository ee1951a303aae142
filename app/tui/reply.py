"""The body of an assistant message: Markdown rendered by Rich into cached screen lines.

Textual's Markdown widget re-lays-out the whole screen on every append (two or
three full layout and paint passes, 30-45 ms of the UI thread on the 2-core CI
machine), and every millisecond of it is taken from llama.cpp. This widget keeps
the rendered lines of finished blocks and renders only the unfinished block again;
while a reply streams it reserves rows ahead of the text, so most updates repaint
a few lines and change no layout at all. See docs/benchmarks.md (#3).
"""
from __future__ import annotations

import re

from markdown_it import MarkdownIt
from rich.cells import cell_len
from rich.markdown import Markdown as RichMarkdown
from textual.geometry import Region, Size
from textual.selection import Selection
from textual.strip import Strip
from textual.widget import Widget

_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_TOP_FENCE = re.compile(r"(`{3,}|~{3,})")  # a fence at column 0: outside any list item
_RULE = re.compile(r" {0,3}([-*_])( *\1){2,} *$")  # a thematic break: Rich spaces what follows it differently
CODE_THEME = "monokai"
CODE_CHUNK = 8  # lines of a growing code block highlighted together while streaming


class _Markdown(RichMarkdown):
    """Rich's Markdown with one shared parser: Rich builds a MarkdownIt per instance,
    which costs more than parsing a paragraph (about 1 ms of the ~3 ms per update)."""

    _parser: MarkdownIt | None = None

    def __init__(self, markup: str) -> None:
        if _Markdown._parser is None:
            _Markdown._parser = MarkdownIt().enable("strikethrough").enable("table")
        # The attributes RichMarkdown.__init__ sets; tests/app/test_reply.py checks the
        # output against RichMarkdown's own, so a change in Rich shows up there.
        self.markup = markup
        self.parsed = self._parser.parse(markup)
        self.code_theme = CODE_THEME
        self.justify = None
        self.style = "none"
        self.hyperlinks = False
        self.inline_code_lexer = None
        self.inline_code_theme = CODE_THEME


def _closes(line: str, fence: str) -> bool:
    """Whether `line` closes a code block opened by `fence`."""
    m = _FENCE.match(line)
    return bool(m) and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
        and not line.strip().strip(fence[0])


def split_blocks(text: str) -> tuple[list[str], str]:
    """`text` cut into finished top-level blocks and the unfinished tail.

    A block ends at a blank line outside a fenced code block; the tail is what
    follows the last such line (it may still grow).

    >>> split_blocks("a\\n\\n```\\nx\\n\\ny\\n```\\n\\nb")
    (['a', '```\\nx\\n\\ny\\n```'], 'b')
    """
    blocks: list[str] = []
    fence: str | None = None
    start = 0
    pos = 0
    for line in text.splitlines(keepends=True):
        end = pos + len(line)
        if not line.endswith("\n"):
            break  # the last, unfinished line belongs to the tail
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and _closes(line, fence):
            fence = None
        elif fence is None and not line.strip():
            block = text[start:pos].strip("\n")
            if block.strip():
                blocks.append(block)
            start = end
        pos = end
    return blocks, text[start:].lstrip("\n")


class ReplyView(Widget):
    """Markdown text as cached lines; `append` while streaming, `finish` when done."""

    DEFAULT_CSS = """
    ReplyView { height: auto; }
    """

    def __init__(self, text: str = "", *, streaming: bool = False, classes: str | None = None) -> None:
        super().__init__(classes=classes)
        self.text = text
        self.streaming = streaming
        self._reserve = 0
        self._width = 0
        self._blocks: list[tuple[str, list[Strip]]] = []  # finished blocks and their lines
        self._lines: list[Strip] = []
        self._stand_in_rows: dict[tuple[str, int], int] = {}
        self._code: tuple[int, list[list[Strip]]] = (-1, [])  # the growing code block's chunks

    # rendering ----------------------------------------------------------------

    def _render_md(self, source: str, width: int, after: str | None = None) -> list[Strip]:
        """`source` rendered at `width`; with `after` (the block before it), rendered as it
        would be there: Rich's spacing between blocks depends on the block before, so a
        one-line stand-in for that block goes first and its line is dropped."""
        console = self.app.console
        options = console.options.update_width(width)
        skip = 0
        if after is not None:
            stand_in = "---" if _RULE.match(after) else "x"
            if (stand_in, width) not in self._stand_in_rows:
                self._stand_in_rows[stand_in, width] = len(console.render_lines(_Markdown(stand_in), options))
            skip = self._stand_in_rows[stand_in, width]
            source = stand_in + "\n\n" + source
        lines = console.render_lines(_Markdown(source), options, style=self.rich_style, pad=True)
        return [Strip(line, width) for line in lines[skip:]]

    def _layout_lines(self, width: int) -> list[Strip]:
        """All lines at `width`: cached finished blocks plus the tail rendered again."""
        if width != self._width:
            self._width = width
            self._blocks = []
            self._code = (-1, [])
        if not self.streaming:
            lines = self._render_md(self.text, width) if self.text.strip() else []
            self._lines = lines
            return lines
        blocks, tail = split_blocks(self.text)
        for i in range(len(self._blocks), len(blocks)):
            self._blocks.append((blocks[i], self._render_md(blocks[i], width, blocks[i - 1] if i else None)))
        lines: list[Strip] = []
        for _, block_lines in self._blocks:
            lines.extend(block_lines)
        if tail.strip():
            lines.extend(self._tail_lines(tail, width, len(blocks), blocks[-1] if blocks else None))
        self._lines = lines
        return lines

    def _tail_lines(self, tail: str, width: int, index: int, after: str | None) -> list[Strip]:
        """The unfinished block's lines. A growing code block is highlighted in cached
        chunks of CODE_CHUNK lines (Pygments costs ~0.4 ms a line, so an 80-line block
        rendered whole on every update took 35 ms); at `finish` it is rendered whole."""
        rows = tail.split("\n")
        at = next((i for i, row in enumerate(rows) if _FENCE.match(row)), None)
        if at is None or not _TOP_FENCE.match(rows[at]):  # no code, or code inside a list item
            return self._render_md(tail, width, after)
        fence = _TOP_FENCE.match(rows[at]).group(1)
        code = rows[at + 1:]  # the last item is the unfinished line
        if any(_closes(row, fence) for row in code):  # closed: finished at the next blank line
            return self._render_md(tail, width, after)
        lines: list[Strip] = []
        head = "\n".join(rows[:at])
        if head.strip():  # "Here is the code:" right above the fence
            lines = self._render_md(head, width, after)
            after = head
        opener, closer = rows[at], "\n" + fence
        if self._code[0] != index:
            self._code = (index, [])
        chunks = self._code[1]
        while len(chunks) < (len(code) - 1) // CODE_CHUNK:
            i = len(chunks)
            part = "\n".join(code[i * CODE_CHUNK:(i + 1) * CODE_CHUNK])
            rendered = self._render_md(opener + "\n" + part + closer, width, after if i == 0 else None)
            # Rich pads a code block with one row above and below: keep the outer ones only.
            chunks.append(rendered[:-1] if i == 0 else rendered[1:-1])
        rest = self._render_md(opener + "\n" + "\n".join(code[len(chunks) * CODE_CHUNK:]) + closer, width,
                               after if not chunks else None)
        return lines + [line for chunk in chunks for line in chunk] + (rest[1:] if chunks else rest)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        if width <= 0:
            return 0
        if width != self._width:
            self._layout_lines(width)
        return max(len(self._lines), self._reserve)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if width != self._width:
            self._layout_lines(width)
        if y < len(self._lines):
            strip = self._lines[y]
            if self.text_selection is not None:
                strip = self._selected(strip, y)
            return strip.apply_offsets(0, y)  # where a mouse selection starts and ends
        return Strip.blank(width, self.rich_style)

    # selection (copy with the mouse) -----------------------------------------------

    def _plain(self) -> str:
        return "\n".join(strip.text.rstrip() for strip in self._lines)

    def get_selection(self, selection: Selection) -> tuple[str, str] | None:
        return selection.extract(self._plain()), "\n"

    def _selected(self, strip: Strip, y: int) -> Strip:
        span = self.text_selection.get_span(y) if self.text_selection else None
        if span is None:
            return strip
        text = strip.text
        start, end = span  # characters, not cells
        start = cell_len(text[:start])
        end = strip.cell_length if end == -1 else cell_len(text[:end])
        style = self.screen.get_component_rich_style("screen--selection")
        parts = strip.divide([start, end])
        if len(parts) < 2:
            return strip
        parts[1] = parts[1].apply_style(style)
        return Strip.join(parts)

    def selection_updated(self, selection: Selection | None) -> None:
        self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._width = 0  # colours changed (theme, focus): render again

    # updates ------------------------------------------------------------------------

    def append(self, piece: str) -> None:
        """Add streamed text; repaint the lines that changed, re-layout only past the reserve."""
        if not piece:
            return
        self.text += piece
        width = self._width
        if width <= 0:
            self.refresh(layout=True)
            return
        before = self._lines
        after = self._layout_lines(width)
        first = 0
        for old, new in zip(before, after):
            if old != new:
                break
            first += 1
        if len(after) <= self._reserve:
            changed = max(len(before), len(after)) - first
            if changed > 0:
                self.refresh(Region(0, first, width, changed))
        else:
            # Reserve two thirds of a page ahead: a layout pass (two, with the scroll that
            # follows) costs ~30 ms, so it should come once per page, not once per line.
            self._reserve = len(after) + max(8, self._page_rows() * 2 // 3)
            self.refresh(layout=True)

    def on_mount(self) -> None:
        if self.streaming:  # the first rows come with the mount's layout, not the first token's
            self._reserve = max(8, self._page_rows() * 2 // 3)

    def _page_rows(self) -> int:
        """Rows of the scrolling container around this widget (the screen's without one)."""
        for node in self.ancestors:
            if isinstance(node, Widget) and node.styles.overflow_y in ("auto", "scroll"):
                return node.scrollable_content_region.height
        return self.screen.size.height

    def finish(self, text: str | None = None) -> None:
        """Streaming ended: render the whole text as one document, drop the reserve."""
        if text is not None:
            self.text = text
        self.streaming = False
        self._reserve = 0
        self._width = 0
        self.refresh(layout=True)
