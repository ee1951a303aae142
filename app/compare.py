"""Compare: one prompt answered by several models, for the user to pick the better.

On a CPU two models do not share memory well, so the models answer one after the
other: load, answer, close. When at most one of them needs the CPU (the others are
remote, or wholly offloaded to a GPU with room for all of them: `at_once`), they
answer side by side, each on its own thread. The chat's own model, when it is one of them, answers on
the chat's engine (already in memory; never closed here). Every model gets the same
turn the chat uses (`ChatSession.send`, the chat's sampling settings and system
prompt) with one seed for all, so the answers differ only by the model.

    >>> cmp = Comparison("Why is the sky blue?", [entry_a, entry_b], settings,   # doctest: +SKIP
    ...                  loader=default_loader, current=("a", chat_engine))
    >>> for step in cmp.run():                                                    # doctest: +SKIP
    ...     print(step.index, step.stage, step.text)
    0 loading
    0 answering
    0 text Rayleigh scattering ...
    0 done
    1 loading
    ...
    >>> [(a.model, a.load_s, a.result.decode_tokens_per_s) for a in cmp.answers]  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import queue
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:  # the engine (llama.cpp, numpy) is imported when a comparison is made, not before
    from models.registry import ModelEntry

    from .config import Settings
    from .engine import Engine, Result

# One comparison per process at a time: each holds a model in memory while it runs, and
# one that was stopped may still be finishing a load it cannot interrupt.
_ONE_AT_A_TIME = threading.Lock()
# Model loads (and closes) one at a time, side by side too: llama-cpp-python points the
# process's stdout and stderr at /dev/null around a load and puts back what it found, so two
# overlapping loads could leave the terminal writing nowhere.
_LOADS = threading.Lock()


def running() -> bool:
    """Whether a comparison (or the close of one that was stopped) is still in progress."""
    return _ONE_AT_A_TIME.locked()


# What a model needs on the GPU beyond its file: its context, buffers and the CUDA runtime's share.
GPU_ROOM = 1.2
GPU_EXTRA = 512 << 20


def free_gpu_bytes() -> int | None:
    """Free memory of the first CUDA device by nvidia-smi, or None where there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=2, check=True).stdout
        return int(out.split()[0]) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _local(entry: ModelEntry) -> bool:
    """Runs on this machine: a GGUF, or a "remote" server on loopback."""
    if entry.kind != "remote":
        return True
    from urllib.parse import urlparse

    return (urlparse(entry.path).hostname or "") in ("localhost", "127.0.0.1", "::1")


def at_once(models: list[ModelEntry], settings: Settings, *, offload: bool | None = None,
            gpu_free: int | None = -1, resident: str | None = None) -> bool:
    """Whether `models` can answer side by side: at most one of them needs the CPU. A remote
    model needs none (unless its server is on this machine); a local one needs none when every
    layer goes to a GPU (gpu_layers -1 on a build that offloads) and the GPU has room for all
    the local models at once (`resident`, the chat's own, is in memory already). `offload` and
    `gpu_free` (bytes, the first GPU's) are detected when not given."""
    local = [m for m in models if _local(m)]
    if len(local) <= 1:
        return len(models) > 1
    if settings.gpu_layers != -1:
        return False
    if offload is None:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
    if not offload:
        return False
    free = free_gpu_bytes() if gpu_free == -1 else gpu_free
    if free is None or not all(m.path for m in local) or any(m.kind == "remote" for m in local):
        return False
    try:
        need = sum(GPU_ROOM * Path(m.file).stat().st_size + GPU_EXTRA for m in local if m.name != resident)
    except (OSError, ValueError):
        return False
    return need <= free


@dataclass
class Answer:
    """One model's answer. load_s is None for the chat's own engine (already loaded)."""

    model: str
    text: str = ""
    load_s: float | None = None
    result: Result | None = None
    error: str = ""

    @property
    def complete(self) -> bool:
        """Answered to the end (a stop, EOS or the token budget), not cancelled nor failed."""
        return self.result is not None and self.result.finish_reason != "cancelled" and not self.error

    def describe(self) -> str:
        """E.g. 'load 0.41 s · 48 tokens · 95.2 tok/s'."""
        parts = ["in memory" if self.load_s is None else f"load {self.load_s:.2f} s"]
        if self.result is not None:
            parts.append(f"{self.result.completion_tokens} tokens · {self.result.decode_tokens_per_s:.1f} tok/s")
            if self.result.finish_reason == "cancelled":
                parts.append("stopped")
        if self.error:
            parts.append(f"failed: {self.error}")
        return " · ".join(parts)


@dataclass
class Step:
    """Progress of a comparison: model `index` is "loading", "answering", has more "text", or is "done"."""

    index: int
    stage: str
    text: str = ""


class Comparison:
    """`prompt` answered by each of `models`, in turn or side by side (`together`: None
    decides by `at_once`); `stop()` cancels from any thread."""

    def __init__(self, prompt: str, models: list[ModelEntry], settings: Settings, *,
                 loader: Callable[[ModelEntry, Settings], Engine], system: str = "",
                 current: tuple[str, Engine] | None = None, together: bool | None = None):
        self.prompt = prompt
        self.models = list(models)
        self.settings = settings
        self.system = system
        self.loader = loader
        self.current = current
        # The chat's seed when it has one, else one drawn now: the same for every model.
        from .engine import Sampling

        self.seed = settings.seed if settings.seed >= 0 else random.randrange(2**31)
        self.sampling = dataclasses.replace(Sampling.from_settings(settings), seed=self.seed)
        self.answers = [Answer(e.name) for e in self.models]
        self.together = (at_once(self.models, settings, resident=current[0] if current else None)
                         if together is None else together)
        self._stopped = threading.Event()
        # The running generations' cancel events (Engine.stream sets one when it is done).
        self._cancels = [threading.Event() for _ in self.models]

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """Cancel the running generation through the engine's cancel event; load nothing more."""
        self._stopped.set()
        for cancel in self._cancels:
            cancel.set()

    def run(self) -> Iterator[Step]:
        """Answer with each model (run this on a worker thread); `answers` fills in. Side by
        side, the steps of the models interleave as they come."""
        if not _ONE_AT_A_TIME.acquire(blocking=False):
            raise RuntimeError("another comparison is still running or closing its model")
        try:
            if self.together:
                yield from self._together()
                return
            for i, entry in enumerate(self.models):
                if self.stopped:
                    return
                yield from self._answer(i, entry)
        finally:
            _ONE_AT_A_TIME.release()

    def _together(self) -> Iterator[Step]:
        steps: queue.Queue[Step | None] = queue.Queue()

        def answer(i: int, entry: ModelEntry) -> None:
            done = False
            try:
                for step in self._answer(i, entry):
                    done = done or step.stage == "done"
                    steps.put(step)
            except Exception as exc:  # e.g. a close that failed: the column still ends, saying so
                self.answers[i].error = self.answers[i].error or str(exc)
                if not done:
                    steps.put(Step(i, "done"))
            finally:
                steps.put(None)

        threads = [threading.Thread(target=answer, args=(i, e), name=f"crofter-compare:{i}", daemon=True)
                   for i, e in enumerate(self.models)]
        try:
            for t in threads:
                t.start()
            left = sum(t.ident is not None for t in threads)
            while left:
                step = steps.get()
                if step is None:
                    left -= 1
                else:
                    yield step
        finally:  # the reader went away early: stop the others, and let them close their models
            if any(t.is_alive() for t in threads):
                self.stop()
            for t in threads:
                if t.ident is not None:
                    t.join()

    def _answer(self, i: int, entry: ModelEntry) -> Iterator[Step]:
        from .session import ChatSession
        from .turn import Done, TextDelta

        answer = self.answers[i]
        own = self.current is not None and entry.name == self.current[0]
        engine = None
        yield Step(i, "loading")
        try:
            if own:
                engine = self.current[1]
                # Evaluate the whole prompt, as a freshly loaded model does: logits differ in
                # the last bits when part of it comes from the chat's KV cache.
                engine.reset()
            else:
                with _LOADS:
                    t0 = time.perf_counter()
                    engine = self.loader(entry, self.settings)
                    answer.load_s = time.perf_counter() - t0
            cancel = self._cancels[i]
            if self.stopped:  # stopped while loading: close it, answer nothing
                return
            yield Step(i, "answering")
            session = ChatSession(engine, self.sampling, system=self.system)
            for ev in session.send(self.prompt, cancel):  # the chat's own turn (a trace is not the answer)
                if isinstance(ev, TextDelta):
                    answer.text += ev.text
                    yield Step(i, "text", ev.text)
                elif isinstance(ev, Done):
                    answer.result = ev.result
                    answer.text = ev.answer
        except Exception as exc:  # this model failed; the others still answer
            answer.error = str(exc)
        finally:
            if engine is not None and not own:
                with _LOADS:
                    engine.close()
        yield Step(i, "done")
