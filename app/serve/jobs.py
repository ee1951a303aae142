"""Blocking work off the event loop, and clients that go away.

Engine calls block (llama.cpp decodes on the engine's worker; tokenizing, template rendering,
grammar building and retrieval run on the caller), so each request's work runs on a thread of
its own and its events come back through an asyncio queue: the loop stays free for the other
clients, and eight concurrent streams all progress.

    job = Job(loop, lambda: run_turn(session, text, cancel=job.cancel), on_end=release)
    job.start()
    async for ev in job.events(): ...

`DisconnectWatch` notices a client that closed its connection while its request is still
waiting (for its place in the line, or for a non-streamed answer) and sets that request's
own cancel event; other requests are untouched.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable, Iterator

_END = object()


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class Job:
    """`produce()` (an iterator of events) run on a thread; `events()` yields them on the loop.
    An exception from `produce` is raised from `events()`. `on_end` runs on the thread once the
    work has stopped, whatever the reason."""

    def __init__(self, loop: asyncio.AbstractEventLoop, produce: Callable[[], Iterator], on_end: Callable[[], None] | None = None,
                 name: str = "crofter-request"):
        self.loop = loop
        self.produce = produce
        self.on_end = on_end
        self.cancel = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            self.cancel.set()

    def _run(self) -> None:
        try:
            for ev in self.produce():
                self._put(ev)
                if self.cancel.is_set():
                    # Keep draining: the producer stops at its next token and ends the turn cleanly.
                    continue
            self._put(_END)
        except BaseException as exc:  # handed to the loop side
            self._put(exc)
        finally:
            self.finished.set()
            if self.on_end is not None:
                self.on_end()

    async def next(self):
        """The next event; raises StopAsyncIteration at the end, or the producer's exception."""
        item = await self.queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def events(self):
        while True:
            try:
                yield await self.next()
            except StopAsyncIteration:
                return


class DisconnectWatch:
    """Watches the ASGI `receive` channel for `http.disconnect` (the body has been read by
    then, so nothing else is read from it) while a request waits."""

    def __init__(self, receive):
        self.gone = asyncio.Event()
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return

    async def run(self, awaitable):
        """Await `awaitable`, or raise ClientGone (cancelling it) if the client leaves first."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        raise ClientGone()

    def stop(self) -> None:
        self._task.cancel()
