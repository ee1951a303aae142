"""The reply body (app/tui/reply.py): block splitting, Rich rendering, streaming without layout."""
from __future__ import annotations

from rich.console import Console
from rich.markdown import Markdown as RichMarkdown
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll

from app.tui.reply import CODE_THEME, ReplyView, _Markdown, split_blocks

DOC = (
    "# Title\n\nSome **bold** and `code` with [a link](https://example.org).\n\n"
    "1. one\n2. two\n\n```python\ndef f():\n\n    return 1\n```\n\n---\n\nafter a rule\n\n"
    "| a | b |\n|---|---|\n| 1 | 2 |\n\n> quoted [bold]not markup[/]\n\n***\n\n- last\n"
)


def test_split_blocks_keeps_fenced_code_whole():
    blocks, tail = split_blocks("a\n\n```\nx\n\ny\n```\n\nb")
    assert blocks == ["a", "```\nx\n\ny\n```"]
    assert tail == "b"
    # a longer fence is closed only by a fence at least as long, of the same character
    blocks, tail = split_blocks("````\n```\n\n~~~\n````\n\nafter\n\n")
    assert blocks == ["````\n```\n\n~~~\n````", "after"]
    assert tail == ""
    # an unfinished code block stays in the tail, blank lines and all
    blocks, tail = split_blocks("intro\n\n~~~\ncode\n\nmore")
    assert blocks == ["intro"]
    assert tail == "~~~\ncode\n\nmore"
    # the last line is not finished until its newline arrives
    assert split_blocks("para one\n") == ([], "para one\n")


def test_shared_parser_renders_like_rich():
    """_Markdown copies what RichMarkdown.__init__ sets; a change in Rich shows up here."""
    console = Console(width=60, force_terminal=True, color_system="truecolor")
    ours = console.render_lines(_Markdown(DOC), console.options)
    theirs = console.render_lines(RichMarkdown(DOC, code_theme=CODE_THEME, hyperlinks=False), console.options)
    assert ours == theirs


class Host(App):
    CSS = "#conv { scrollbar-gutter: stable; }"

    def __init__(self, view: ReplyView) -> None:
        super().__init__()
        self.view = view

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="conv"):
            yield self.view


def plain(view: ReplyView) -> list[str]:
    return [strip.text.rstrip() for strip in view._lines]


async def streamed_and_final(pilot, view: ReplyView, doc: str) -> tuple[list[str], list[str]]:
    """The lines on screen at the end of streaming, and after `finish` renders `doc` whole."""
    await pilot.pause()
    streamed = plain(view)
    view.finish(doc)
    await pilot.pause()
    return streamed, plain(view)


async def test_streamed_text_ends_as_the_whole_document():
    view = ReplyView(streaming=True)
    app = Host(view)
    async with app.run_test(size=(60, 30)) as pilot:
        await pilot.pause()
        for i in range(0, len(DOC), 7):
            view.append(DOC[i:i + 7])
            await pilot.pause()
        streamed, final = await streamed_and_final(pilot, view, DOC)
        shown = "\n".join(final)
        assert "Title" in shown and "def f():" in shown and "return 1" in shown
        assert streamed == final  # block-wise rendering agrees with the one-document render here
        assert "quoted [bold]not markup[/]" in shown  # shown literally
        assert view.virtual_region.height == len(final)  # the reserve is gone


async def test_appends_within_the_reserve_change_no_layout():
    view = ReplyView(streaming=True)
    app = Host(view)
    async with app.run_test(size=(60, 30)) as pilot:
        await pilot.pause()
        reserve = view._reserve
        assert reserve >= 8  # rows were reserved when the view was mounted
        layouts = []
        original = view.refresh

        def spy(*regions, layout=False, **kw):
            layouts.append(layout)
            return original(*regions, layout=layout, **kw)

        view.refresh = spy
        for word in ("Hello", " there,", " this", " is", " one", " short", " paragraph."):
            view.append(word)
            await pilot.pause()
        assert layouts and not any(layouts), layouts  # repaints only
        assert view.size.height == reserve
        assert plain(view)[0] == "Hello there, this is one short paragraph."
        # past the reserve, one layout grows it by two thirds of the page
        view.append("\n\n" + "\n\n".join(f"line {i}" for i in range(reserve)))
        await pilot.pause()
        assert layouts[-1] is True
        assert view._reserve > len(view._lines) > reserve


async def test_width_change_renders_again_and_selection_reads_lines():
    text = "word " * 40
    view = ReplyView(text)
    app = Host(view)
    async with app.run_test(size=(60, 20)) as pilot:
        await pilot.pause()
        narrow = len(view._lines)
        await pilot.resize_terminal(100, 20)
        await pilot.pause()
        assert len(view._lines) < narrow
        from textual.selection import Selection

        copied, _ = view.get_selection(Selection(None, None))
        assert copied.split() == text.split()


def test_pacer_keeps_the_ui_share():
    """The update interval follows the UI thread's measured CPU share (messages.Pacer)."""
    import time

    from app.tui.messages import MAX_UPDATE_INTERVAL_S, MIN_UPDATE_INTERVAL_S, Pacer

    pacer = Pacer()
    pacer.update()
    for _ in range(6):  # a UI thread busy all the time: the interval climbs to the cap
        t = time.thread_time()
        while time.thread_time() - t < 0.01:
            pass
        pacer.update()
    assert pacer.interval == MAX_UPDATE_INTERVAL_S
    pacer.restart()
    pacer.update()
    for _ in range(8):  # an idle UI thread: back down to the floor
        time.sleep(0.05)
        pacer.update()
    assert pacer.interval < 2 * MIN_UPDATE_INTERVAL_S


def test_forward_coalesces_tokens_and_returns_the_result():
    from app.budget import Fit
    from app.engine import Result
    from app.tools.calling import ToolCall
    from app.tui.messages import Pacer, forward
    from app.turn import Done, TextDelta, ThinkingDelta, ToolFinished

    posted = []
    pacer = Pacer()
    pacer.interval = 3600.0  # one post for the first piece, the rest held until a flush
    call = ToolCall("calculator", {"expression": "1+1"}, "ok", "2")
    done = Done("Hello, world", Result("Hello, world", "stop", 1, 4, 1, 0.0, 0.0, 0.0), Fit([], [], 1, 8), "stop")
    events = ([ThinkingDelta("hm"), ThinkingDelta("m")] + [TextDelta(t) for t in ("Hel", "lo")] + [ToolFinished(call)]
              + [TextDelta(t) for t in (",", " world")] + [done])
    assert forward(iter(events), pacer, posted.append) is done
    # the first piece at once; a change of kind or a tool call flushes what was held
    assert [(type(m).__name__, getattr(m, "text", None)) for m in posted] == [
        ("ThinkingPiece", "hm"), ("ThinkingPiece", "m"), ("ReplyPiece", "Hello"), ("ToolCallDone", None),
        ("ReplyPiece", ", world")]
    assert posted[3].call is call


async def test_a_growing_code_block_is_highlighted_in_chunks():
    code = "\n".join(f"def f{i}(x):\n    return x * {i}  # {i}" for i in range(20))
    doc = f"Here is the code:\n```python\n{code}\n```\nand after it\n\nthe end"
    view = ReplyView(streaming=True)
    app = Host(view)
    async with app.run_test(size=(60, 30)) as pilot:
        await pilot.pause()
        cut = doc.index("# 15")
        view.append(doc[:cut])
        chunks = view._code[1]
        assert len(chunks) >= 3  # 30+ finished code lines: cached, not highlighted again
        first = chunks[0]
        view.append(doc[cut:cut + 10])
        assert view._code[1][0] is first
        for i in range(cut + 10, len(doc), 6):
            view.append(doc[i:i + 6])
        streamed, final = await streamed_and_final(pilot, view, doc)
        assert streamed == final
        assert "    return x * 19  # 19" in "\n".join(streamed)


async def test_code_inside_a_list_item_is_not_chunked():
    doc = "1. Install:\n   ```bash\n" + "".join(f"   step {i}\n" for i in range(20)) + "   ```\n2. Run it\n"
    view = ReplyView(streaming=True)
    app = Host(view)
    async with app.run_test(size=(60, 40)) as pilot:
        await pilot.pause()
        for i in range(0, len(doc), 5):
            view.append(doc[i:i + 5])
        assert view._code[1] == []  # rendered with its list item, not as loose code chunks
        streamed, final = await streamed_and_final(pilot, view, doc)
        assert streamed == final


def long_reply() -> str:
    """About 10k tokens of the Markdown a model writes: headings, paragraphs, lists, code, tables, quotes."""
    parts = []
    for i in range(60):
        parts.append(f"## Part {i}: on the number {i}\n\nThe number {i} is {'even' if i % 2 == 0 else 'odd'}, "
                     f"and **{i} squared** is `{i * i}`. " + "It has properties worth a sentence or two. " * 3)
        parts.append("\n".join(f"{k}. item {k} of part {i}, with *emphasis* and a [link](https://example.org/{k})"
                               for k in range(1, 5)))
        parts.append("```python\n" + "\n".join(f"def f{i}_{k}(x):\n    return x * {k} + {i}  # [bold]not markup[/]"
                                               for k in range(4)) + "\n```")
        parts.append("| n | n² | n³ |\n|---|---|---|\n" + "\n".join(f"| {i + k} | {(i + k) ** 2} | {(i + k) ** 3} |"
                                                                  for k in range(3)))
        parts.append(f"> A quote in part {i}: <tag> & ampersand \\[escaped\\].")
    return "\n\n".join(parts) + "\n"


async def test_a_10k_token_streamed_reply_ends_as_its_final_render(engine):
    """L4: a reply of 10k tokens, streamed in the pieces the app posts, leaves on screen
    exactly the lines the whole document renders to."""
    doc = long_reply()
    assert len(engine.tokenize(doc, special=False)) >= 10_000
    view = ReplyView(streaming=True)
    app = Host(view)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.pause()
        step = 160  # ~40 tokens: what one paced update carries at ~200 tok/s
        for n, i in enumerate(range(0, len(doc), step)):
            view.append(doc[i:i + step])
            if n % 8 == 0:
                await pilot.pause()
        streamed, final = await streamed_and_final(pilot, view, doc)
        assert len(final) > 1500
        assert streamed == final
