"""A request's way through the server: a place in its model's line, the engine, the gate,
then its job on a thread; the client leaving at any point cancels only its own work.

    started = await start(pool, request, "smollm2-135m", lambda engine, cancel: events(...))
    first = started.first          # the job's first event (errors surface here, before any response)

Waiting for the first event before answering means a prompt over the window, an unknown
collection or a grammar that will not build is a proper 4xx, not an error inside a 200
stream. Once the job runs, its thread owns the model's gate and gives it back when the work
has stopped (a cancelled generation stops at its next token).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import from_exception
from .jobs import ClientGone, DisconnectWatch, Job

log = logging.getLogger("crofter.serve")


@dataclass
class Started:
    job: Job
    first: object  # the first event, or None when the job produced none
    ended: bool  # the job has already finished (its first item was its end)


class Finishes:
    """How the last generations ended (request id, endpoint, model, finish_reason, tokens):
    what a disconnected stream did after its client left, for the log and for tests."""

    def __init__(self, keep: int = 256):
        self.items: collections.deque = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def add(self, **record) -> None:
        with self.changed:
            self.items.append(record)
            self.changed.notify_all()
        log.info("finished %(id)s %(endpoint)s model=%(model)s finish=%(finish_reason)s tokens=%(completion_tokens)s", record)

    def wait_for(self, request_id: str, timeout: float) -> dict | None:
        """The record of `request_id`, waiting up to `timeout` s for it (tests, tools)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for r in self.items:
                    if r["id"] == request_id:
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)


async def start(pool, request, name: str, make: Callable[[object, threading.Event, object], Iterator]) -> Started:
    """Join `name`'s line, load its engine, wait for the gate, start `make(engine, cancel, slot)`
    on a thread and return its first event. Raises ClientGone if the client left meanwhile
    (its job, if started, is cancelled), or the job's own first error."""
    loop = asyncio.get_running_loop()
    slot = pool.join(name)
    watch = DisconnectWatch(request.receive)
    holding = job = None
    try:
        engine = await watch.run(pool.engine(slot))
        await watch.run(pool.acquire(slot))
        holding = True
        job = Job(loop, lambda: make(engine, job.cancel, slot), on_end=pool.release_from_thread(loop, slot),
                  name=f"crofter-request:{name}")
        job.start()
        try:
            first = await watch.run(job.next())
            return Started(job, first, False)
        except StopAsyncIteration:
            return Started(job, None, True)
    except ClientGone:
        if job is not None:
            job.cancel.set()
        raise
    except Exception as exc:
        if job is not None:
            job.cancel.set()  # the thread gives the place back when it stops
        # As an ApiError, the route's own handler answers it and the connection stays usable;
        # left to the catch-all, Starlette answers and then drops the keep-alive connection.
        raise from_exception(exc) from exc
    except BaseException:
        if job is not None:
            job.cancel.set()
        raise
    finally:
        watch.stop()
        if job is None:
            pool.leave(slot, holding=bool(holding))


async def rest(started: Started, request) -> list:
    """Every event after the first, for a non-streamed answer; the client leaving cancels it."""
    out = [] if started.first is None else [started.first]
    if started.ended:
        return out
    watch = DisconnectWatch(request.receive)
    try:
        while True:
            try:
                out.append(await watch.run(started.job.next()))
            except StopAsyncIteration:
                return out
    except BaseException:
        started.job.cancel.set()
        raise
    finally:
        watch.stop()
