"""One engine per model, loaded on first use, at most `max_models` resident, a line per model.

Every request for a model takes a place in that model's line (`Slot.pending` counts the one
running and those waiting; past `queue` waiting a request gets a 429 with Retry-After). The
line is FIFO (`asyncio.Lock` wakes its waiters in order) and a request holds the model for its
whole turn, so requests never interleave or cancel one another; a request whose client goes
away while it waits leaves the line without touching the engine. The place is given back by
the job thread when its work has really stopped (`release`, via the event loop), not when the
HTTP side gives up, so the next request starts on an idle engine.

Loading a model past `max_models` evicts the least recently used resident one, idle ones
first (remote models, relayed to their server, hold no weights here and do not count); an evicted engine is closed when its last request has finished (never under one).
All of this runs on the event loop thread, so the bookkeeping needs no locks.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict

import anyio

from .errors import ApiError

log = logging.getLogger("crofter.serve")


def _remote(slot) -> bool:
    return getattr(slot.entry, "kind", "") == "remote"


class Slot:
    """One model of the pool: its engine (None until loaded), its line, its scorer."""

    def __init__(self, name: str, entry):
        self.name = name
        self.entry = entry
        self.engine = None
        self.gate = asyncio.Lock()  # held by the request whose job is running
        self.loading = asyncio.Lock()
        self.pending = 0  # requests holding a place in the line (running + waiting)
        self.evicted = False
        self.scorer = None  # made on first use, on a job thread (under the gate)
        self.used = time.monotonic()


class ModelPool:
    """The server's models. `entries`: name -> models.registry.ModelEntry of what it offers."""

    def __init__(self, entries: dict, loader, max_models: int = 1, queue: int = 32, retry_after_s: int = 1):
        self.entries = entries
        self.loader = loader
        self.max_models = max_models
        self.queue = queue
        self.retry_after_s = retry_after_s
        self.slots: OrderedDict[str, Slot] = OrderedDict()  # resident or loading, least recent first
        self._closing: list[Slot] = []  # evicted, waiting for their requests to finish

    # -- the line ----------------------------------------------------------------------------
    def join(self, name: str) -> Slot:
        """A place in `name`'s line (404 for a model the server does not offer, 429 when the
        line is full). The caller must `leave` or hand the place to a job (`release`)."""
        if name not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none"
            raise ApiError(404, f"model {name!r} does not exist (this server offers: {known})", "model", "model_not_found")
        slot = self.slots.get(name)
        if slot is None:
            slot = self.slots[name] = Slot(name, self.entries[name])
        if slot.pending > self.queue:  # one running plus `queue` waiting
            raise ApiError(429, f"model {name!r} has {slot.pending - 1} requests waiting (the most is {self.queue}); "
                           f"retry later", code="queue_full", headers={"Retry-After": str(self.retry_after_s)})
        slot.pending += 1
        self.slots.move_to_end(name)
        slot.used = time.monotonic()
        return slot

    async def engine(self, slot: Slot):
        """The slot's engine, loaded (on a worker thread) the first time; evicts to make room."""
        async with slot.loading:
            if slot.engine is None:
                self._make_room(slot)
                t0 = time.perf_counter()
                try:
                    slot.engine = await anyio.to_thread.run_sync(self.loader, slot.entry)
                except BaseException:
                    if slot.pending <= 1 and self.slots.get(slot.name) is slot:
                        del self.slots[slot.name]  # the next request tries afresh
                    raise
                log.info("loaded %s in %.2f s (n_ctx %d)", slot.name, time.perf_counter() - t0, slot.engine.n_ctx)
        return slot.engine

    async def acquire(self, slot: Slot) -> None:
        """Wait for the slot's turn (FIFO)."""
        await slot.gate.acquire()

    def leave(self, slot: Slot, holding: bool = False) -> None:
        """Give the place back (and the gate, if `holding`); runs on the event loop."""
        if holding:
            slot.gate.release()
        slot.pending -= 1
        slot.used = time.monotonic()
        if slot.evicted and slot.pending == 0:
            self._close(slot)
        elif slot.engine is None and slot.pending == 0 and not slot.loading.locked() and self.slots.get(slot.name) is slot:
            del self.slots[slot.name]  # never loaded: nothing resident to keep

    def release_from_thread(self, loop: asyncio.AbstractEventLoop, slot: Slot):
        """A callable for a job thread that gives the gate and the place back on the loop."""
        def release() -> None:
            loop.call_soon_threadsafe(self.leave, slot, True)
        return release

    # -- residency ---------------------------------------------------------------------------
    def resident(self) -> list[str]:
        return [n for n, s in self.slots.items() if s.engine is not None]

    def _make_room(self, loading: Slot) -> None:
        """Evict to keep `max_models` local engines; a remote model (a client of another server,
        no weights here) neither counts nor evicts."""
        if _remote(loading):
            return
        others = [s for s in self.slots.values()
                  if s is not loading and not _remote(s) and (s.engine is not None or s.loading.locked())]
        while len(others) >= self.max_models:
            idle = [s for s in others if s.pending == 0]
            victim = (idle or others)[0]  # least recently used first (the OrderedDict's order)
            others.remove(victim)
            del self.slots[victim.name]
            victim.evicted = True
            log.info("evicting %s (%d requests still on it)", victim.name, victim.pending)
            if victim.pending == 0:
                self._close(victim)
            else:
                self._closing.append(victim)

    def _close(self, slot: Slot) -> None:
        if slot in self._closing:
            self._closing.remove(slot)
        engine, scorer, slot.engine, slot.scorer = slot.engine, slot.scorer, None, None
        if engine is None and scorer is None:
            return

        def close() -> None:  # joins the engine's worker: off the event loop
            if scorer is not None:
                scorer.close()
            if engine is not None:
                engine.close()
            log.info("closed %s", slot.name)

        threading.Thread(target=close, name=f"crofter-close:{slot.name}", daemon=True).start()

    def close_all(self) -> None:
        """At shutdown: close every engine (requests are over by then)."""
        for slot in list(self.slots.values()) + list(self._closing):
            for thing in (slot.scorer, slot.engine):
                if thing is not None:
                    thing.close()
            slot.engine = slot.scorer = None
        self.slots.clear()
        self._closing.clear()
