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


class ToolCallDone(Message):
    """A tool call of the current turn finished (ok, error, denied or repeated)."""

    def __init__(self, call) -> None:
        self.call = call
        super().__init__()


class ReplyDone(Message):
    """The reply ended: its Result (None after an error), the new context meter text, the error."""

    def __init__(self, result, meter: str, error: str | None = None) -> None:
        self.result = result
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
    """Post the text of a reply's `events` as ReplyPiece messages, coalesced to one per
    `pacer.interval`; return the final result (the event with `done`). Runs on the
    generation thread."""
    result = None
    pending: list[str] = []
    last_post: float | None = None  # the first piece goes out at once
    for ev in events:
        if ev.text:
            pending.append(ev.text)
            now = time.monotonic()
            if last_post is None or now - last_post >= pacer.interval:
                post(ReplyPiece("".join(pending)))
                pending.clear()
                last_post = now
        if ev.done is not None:
            result = ev.done
    if pending:
        post(ReplyPiece("".join(pending)))
    return result
