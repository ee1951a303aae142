"""Messages from the generation thread to the screen, and the pace at which they are sent.

Screen updates of a streaming reply are paced so that the UI thread (Markdown
rendering, painting) uses about UI_CPU_SHARE of one core: on a 2-core machine
every millisecond it spends is taken from llama.cpp's threads and the GIL (the
decode slows by 1-1.5x the UI thread's share). An update costs ~3 ms since replies
render through tui.reply.ReplyView, so 1.5% is about 5 updates/s; see
docs/benchmarks.md.
"""
from __future__ import annotations

import time

from textual.message import Message

MIN_UPDATE_INTERVAL_S = 0.05
MAX_UPDATE_INTERVAL_S = 0.5
UI_CPU_SHARE = 0.015


class ReplyPiece(Message):
    """More text of the reply being generated."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__()


class ThinkingPiece(Message):
    """More of the reply's reasoning trace."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__()


# The reply's note when its answer does not state the result its tool call gave (turn.Done.contradicts_result).
CONTRADICTS = " · ⚠ the answer does not state the tool's result"


class ToolCallDone(Message):
    """A tool call of the current turn finished (ok, error, denied or repeated)."""

    def __init__(self, call) -> None:
        self.call = call
        super().__init__()


class ReplyDone(Message):
    """The turn ended: its turn.Done (None after an error), the new context meter text, the error."""

    def __init__(self, done, meter: str, error: str | None = None) -> None:
        self.done = done
        self.meter = meter
        self.error = error
        super().__init__()


class Pacer:
    """The update interval, adapted after each screen update to the UI thread's CPU share.

    `interval` is read by the generation thread (a float read is atomic in CPython);
    `update()` runs on the UI thread, whose `time.thread_time()` it measures.
    """

    def __init__(self) -> None:
        self.interval = MIN_UPDATE_INTERVAL_S
        self._clock: tuple[float, float] | None = None

    def restart(self) -> None:
        self._clock = None

    def update(self) -> None:
        now = (time.thread_time(), time.perf_counter())
        if self._clock is not None:
            cpu, wall = now[0] - self._clock[0], now[1] - self._clock[1]
            if wall > 0:
                wanted = self.interval * (cpu / wall) / UI_CPU_SHARE
                smoothed = 0.5 * self.interval + 0.5 * wanted
                self.interval = min(MAX_UPDATE_INTERVAL_S, max(MIN_UPDATE_INTERVAL_S, smoothed))
        self._clock = now


def forward(events, pacer: Pacer, post) -> object | None:
    """Post a turn's events to the screen: answer and thinking text as ReplyPiece and
    ThinkingPiece messages, each coalesced to one per `pacer.interval`, a finished tool call
    at once; return the turn's `Done`. Runs on the generation thread."""
    from ..turn import Done, TextDelta, ThinkingDelta, ToolFinished  # not at import: see app.py

    done = None
    pending: list[str] = []
    kind = ReplyPiece
    last_post: float | None = None  # the first piece goes out at once

    def flush() -> None:
        if pending:
            post(kind("".join(pending)))
            pending.clear()

    for ev in events:
        if isinstance(ev, (TextDelta, ThinkingDelta)):
            piece = ReplyPiece if isinstance(ev, TextDelta) else ThinkingPiece
            if piece is not kind:
                flush()
                kind = piece
            pending.append(ev.text)
            now = time.monotonic()
            if last_post is None or now - last_post >= pacer.interval:
                flush()
                last_post = now
        elif isinstance(ev, ToolFinished):
            flush()
            post(ToolCallDone(ev.call))
        elif isinstance(ev, Done):
            done = ev
    flush()
    return done
