"""The compare view (Pilot, real app, real llama.cpp loads): one prompt answered by two models
one after the other, the pick stored as DPO preference pairs, Esc cancelling cleanly.

Only one chat model is bundled (SmolLM2-135M). The "two models" here are that GGUF and, where
the answers must differ, a byte-for-byte copy of it whose chat template's default system prompt
says something else (same weights, a different model file to the app: registered under its own
name, probed, loaded and closed like any other); where they must agree, the same file under a
second name. The chat's model answers on the chat's engine; the other is loaded for the
comparison through the app's loader and closed after it.
"""
from __future__ import annotations

import shutil
import threading
import time

import pytest
from textual.widgets import SelectionList

from app.chat import default_loader
from app.preferences import PreferenceStore
from app.render import display_safe
from app.tui import compare
from app.tui.app import CrofterApp
from app.tui.compare import AnswerColumn, CompareScreen
from finetune.data import load_preferences
from models.registry import Registry

from .pilot import SIZE, controller, say, screen_text, start, wait_for

DEFAULT_SYSTEM = b"You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PIRATE_SYSTEM = b"You are a grumpy old pirate. Answer in pirate talk and shout a lot!!"


@pytest.fixture(scope="module")
def pirate_gguf(bundled_path, tmp_path_factory):
    """The bundled GGUF with another default system prompt in its chat template (same length,
    so every offset in the file stays valid)."""
    assert len(DEFAULT_SYSTEM) == len(PIRATE_SYSTEM)
    path = tmp_path_factory.mktemp("pirate") / "smollm2-pirate.gguf"
    shutil.copyfile(bundled_path, path)
    with open(path, "r+b") as fh:
        head = fh.read(4 << 20)
        at = head.find(DEFAULT_SYSTEM)
        assert at > 0 and head.count(DEFAULT_SYSTEM) == 1
        fh.seek(at)
        fh.write(PIRATE_SYSTEM)
    return path


def engine_threads() -> int:
    return sum(t.name.startswith("crofter-engine:") for t in threading.enumerate())


async def opened(pilot, app) -> CompareScreen:
    """The compare view, once it is on screen with its widgets."""
    await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.query("#compare-models"))
    return app.screen


async def choose(pilot, screen, name):
    """Tick `name` in the model list with the keyboard."""
    models = screen.query_one("#compare-models", SelectionList)
    models.focus()
    models.highlighted = [models.get_option_at_index(i).value for i in range(models.option_count)].index(name)
    await pilot.press("space")
    return models


def _chat_and_compare(engine, **settings):
    """The chat runs on the shared engine; the compare view loads the others for real
    through the controller's loader, as the app does."""
    ctl = controller(engine, **settings)
    ctl.loader = lambda entry, s: engine if entry.name == "smollm2-135m" else default_loader(entry, s)
    return ctl


async def test_two_models_answer_in_turn_and_the_pick_is_stored_as_a_pair(engine, pirate_gguf):
    Registry().add(pirate_gguf, name="smollm2-pirate")
    ctl = _chat_and_compare(engine, max_tokens=32)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        threads = engine_threads()
        app.query_one("#prompt").load_text("Tell me about the sea.")
        await pilot.press("f9")
        screen = await opened(pilot, app)
        assert screen.query_one("#compare-models", SelectionList).selected == ["smollm2-135m"]  # the chat's model
        assert screen.query_one("#compare-prompt").text == "Tell me about the sea."  # the chat's draft
        models = await choose(pilot, screen, "smollm2-pirate")
        assert sorted(models.selected) == ["smollm2-135m", "smollm2-pirate"]
        await pilot.press("f9")
        await wait_for(pilot, lambda: screen.phase == "picking")

        a, b = screen.comparison.answers
        assert (a.model, b.model) == ("smollm2-135m", "smollm2-pirate")
        assert a.complete and b.complete and a.text.strip() and b.text.strip()
        assert a.load_s is None and b.load_s > 0  # the chat's engine answered; the other was loaded
        assert a.text != b.text  # different default system prompts, different answers
        assert a.result.decode_tokens_per_s > 0 and b.result.decode_tokens_per_s > 0
        # The labels are updated before the phase turns; the screen repaints on the next refresh.
        await wait_for(pilot, lambda: screen_text(app).count("tok/s") == 2, timeout=10)
        shown = screen_text(app)
        assert "in memory" in shown and f"load {b.load_s:.2f} s" in shown
        columns = {c.index: c for c in screen.query(AnswerColumn)}
        assert columns[0].reply.text == display_safe(a.text) and columns[1].reply.text == display_safe(b.text)
        # Loaded, answered, closed: no engine besides the chat's is left, and the chat keeps its own.
        assert engine_threads() == threads and ctl.engine is engine and ctl.model.name == "smollm2-135m"

        await pilot.press("2")
        await pilot.pause()
        records = PreferenceStore().all()
        assert len(records) == 1 and records == screen.stored
        rec = records[0]
        assert display_safe(rec["chosen"]) == columns[1].reply.text  # what the picked column showed
        assert display_safe(rec["rejected"]) == columns[0].reply.text
        assert (rec["prompt"], rec["chosen_model"], rec["rejected_model"]) == (
            "Tell me about the sea.", "smollm2-pirate", "smollm2-135m")
        await wait_for(pilot, lambda: "Stored 1 preference pair" in screen_text(app), timeout=10)
        assert "preferred over smollm2-135m" in screen_text(app)
        await pilot.press("1")  # one pick per comparison
        await pilot.pause()
        assert len(PreferenceStore().all()) == 1

        out = PreferenceStore().path.with_name("export.jsonl")
        assert PreferenceStore().export(out) == 1
        [pair] = load_preferences(out)
        assert pair["chosen"][0]["content"] == b.text and pair["rejected"][0]["content"] == a.text

        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, CompareScreen))


async def test_one_seed_for_every_model_the_same_model_answers_the_same_and_nothing_is_stored(engine, bundled_path):
    """Sampled at temperature 0.8 with the seed the comparison draws: the chat's engine and a fresh
    load of the same file (like with like, on this machine) give the same words, so a pick has no
    pair to store, and says so."""
    Registry().add(bundled_path, name="smollm2-again")
    ctl = _chat_and_compare(engine, temperature=0.8, seed=-1, max_tokens=24)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        [command] = [c for c in app.get_system_commands(app.screen) if c.title == "Compare models"]
        await command.callback()  # what the command palette runs
        screen = await opened(pilot, app)
        await choose(pilot, screen, "smollm2-again")
        screen.query_one("#compare-prompt").load_text("Write a line about rain.")
        await pilot.press("f9")
        await wait_for(pilot, lambda: screen.phase == "picking")
        a, b = screen.comparison.answers
        assert a.complete and b.complete and a.text.strip()
        assert screen.comparison.sampling.seed >= 0 and a.text == b.text
        await pilot.click("#pick-1")
        await pilot.pause()
        assert screen.phase == "done" and screen.stored == [] and PreferenceStore().all() == []
        await wait_for(pilot, lambda: "Nothing stored: every other answer is identical" in screen_text(app), timeout=10)


class HeldLlama:
    """A loaded model's llama.cpp handle whose token loop, after the first token, waits for
    `release`: the engine's worker is surely mid-generation while the test presses keys. Once
    released, the worker goes on to its next token, where it checks the cancel event."""

    def __init__(self, llm):
        self._llm = llm
        self.generating = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def generate(self, *args, **kwargs):
        tokens = self._llm.generate(*args, **kwargs)
        try:
            for i, token in enumerate(tokens):
                yield token
                if i == 0:
                    self.generating.set()
                    assert self.release.wait(120)
        finally:
            tokens.close()


async def test_escape_during_the_second_answer_cancels_it_closes_its_model_and_stores_nothing(engine, pirate_gguf):
    Registry().add(pirate_gguf, name="smollm2-pirate")
    held = []

    def loader(entry, settings):  # the app's loader, the model's token loop held
        eng = default_loader(entry, settings)
        held.append(HeldLlama(eng.llm))
        eng.llm = held[-1]
        return eng

    ctl = controller(engine, max_tokens=32)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        threads = engine_threads()
        app.query_one("#prompt").load_text("Tell me about the sea.")
        compare.open_compare(app, loader=loader)
        screen = await opened(pilot, app)
        await choose(pilot, screen, "smollm2-pirate")
        await pilot.press("f9")
        second = screen.query_one("#column-2", AnswerColumn)
        await wait_for(pilot, lambda: held and held[0].generating.is_set())
        await pilot.pause()
        assert "answering" in str(second.query_one(".compare-note").content)
        assert screen.comparison.answers[0].complete and screen.phase == "running"
        await pilot.press("1")  # no pick before every answer is in
        await pilot.pause()
        assert screen.stored == [] and not PreferenceStore().path.exists()

        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, CompareScreen) and screen.comparison.stopped)
        held[0].release.set()
        await wait_for(pilot, screen.finished.is_set)
        answer = screen.comparison.answers[1]
        assert answer.result is not None and answer.result.finish_reason == "cancelled"
        assert answer.result.completion_tokens == 1  # stopped at the token after the hold
        assert len(held) == 1 and engine_threads() == threads  # closed: nothing left loaded
        assert not PreferenceStore().path.exists()
        # The chat still has its model and answers on it.
        assert ctl.engine is engine
        await say(pilot, "Hello")
        assert ctl.store.messages(ctl.chat.id)[-1].role == "assistant"


def test_a_model_that_fails_to_load_is_reported_in_its_column_and_the_others_still_answer(engine, tmp_path):
    from app.compare import Comparison
    from app.config import Settings
    from models.registry import ModelEntry

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 60)
    entries = [ModelEntry("broken", str(broken), "gguf"), ModelEntry("smollm2-135m", "", "gguf", "bundled")]
    cmp = Comparison("Say hello.", entries, Settings(temperature=0.0, max_tokens=8, n_ctx=2048),
                     loader=default_loader, current=("smollm2-135m", engine))
    stages = [(s.index, s.stage) for s in cmp.run() if s.stage != "text"]
    assert stages == [(0, "loading"), (0, "done"), (1, "loading"), (1, "answering"), (1, "done")]
    bad, good = cmp.answers
    assert "broken.gguf" in bad.error and not bad.complete and "failed:" in bad.describe()
    assert good.complete and good.text.strip() and good.load_s is None


class GatedLlama(HeldLlama):
    """A model whose first token waits (up to `wait` s) until `other` is generating too."""

    def __init__(self, llm, me: threading.Event, other: threading.Event, wait: float, seen: list):
        super().__init__(llm)
        self.me, self.other, self.wait, self.seen = me, other, wait, seen

    def generate(self, *args, **kwargs):
        self.me.set()
        self.seen.append(self.other.wait(self.wait))
        yield from self._llm.generate(*args, **kwargs)


def test_side_by_side_the_models_answer_at_once_and_as_they_answer_in_turn(bundled_path):
    """together=True on this CPU (the path a GPU that holds both takes): both models are
    generating at the same time, and each answer equals the one the same file gives in turn.
    Loads stay one at a time (llama-cpp-python redirects the process's stdout around a load)."""
    from app.compare import Comparison
    from app.config import Settings
    from models.registry import ModelEntry

    entries = [ModelEntry("a", str(bundled_path), "gguf"), ModelEntry("b", str(bundled_path), "gguf")]
    settings = Settings(temperature=0.0, max_tokens=12, n_ctx=1024, seed=5)
    runs, seen = {}, {}
    before = engine_threads()
    for together in (False, True):
        gates = {"a": threading.Event(), "b": threading.Event()}
        seen[together] = []

        def loader(entry, s, together=together, gates=gates):  # each waits, at its first token, for the other
            eng = default_loader(entry, s)
            other = gates["b" if entry.name == "a" else "a"]
            eng.llm = GatedLlama(eng.llm, gates[entry.name], other, 15 if together else 0.3, seen[together])
            return eng

        cmp = Comparison("Name a colour.", entries, settings, loader=loader, together=together)
        assert cmp.together is together
        stages = [(s.index, s.stage) for s in cmp.run() if s.stage != "text"]
        runs[together] = cmp
        assert sorted(stages) == sorted([(0, "loading"), (0, "answering"), (0, "done"),
                                         (1, "loading"), (1, "answering"), (1, "done")])
    assert seen[False] == [False, True] and seen[True] == [True, True]  # in turn, the first answers alone
    in_turn, side = runs[False].answers, runs[True].answers
    assert all(a.complete for a in in_turn + side)
    assert [a.text for a in side] == [a.text for a in in_turn] and side[0].text.strip()
    assert engine_threads() == before  # both comparisons closed the models they loaded


def test_a_stop_side_by_side_cancels_every_answer_and_closes_every_model(bundled_path):
    from app.compare import Comparison
    from app.config import Settings
    from models.registry import ModelEntry

    held = []

    def loader(entry, settings):  # each model's token loop held after its first token
        eng = default_loader(entry, settings)
        held.append(HeldLlama(eng.llm))
        eng.llm = held[-1]
        return eng

    entries = [ModelEntry(n, str(bundled_path), "gguf") for n in ("a", "b")]
    cmp = Comparison("Tell me about the sea.", entries, Settings(temperature=0.0, max_tokens=64, n_ctx=1024),
                     loader=loader, together=True)
    before = engine_threads()
    both = []

    def stop_when_both_generate():
        deadline = time.monotonic() + 120
        while len(held) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        both.append(all(h.generating.wait(120) for h in list(held)))  # both mid-answer at once
        cmp.stop()
        for h in held:
            h.release.set()

    watcher = threading.Thread(target=stop_when_both_generate)
    watcher.start()
    steps = list(cmp.run())
    watcher.join()
    assert both == [True] and len(held) == 2
    assert [a.result.finish_reason for a in cmp.answers] == ["cancelled", "cancelled"]
    assert [a.result.completion_tokens for a in cmp.answers] == [1, 1]  # stopped at the token after the hold
    assert {(s.index, s.stage) for s in steps if s.stage == "done"} == {(0, "done"), (1, "done")}
    assert engine_threads() == before  # both closed


def test_side_by_side_only_when_at_most_one_model_needs_the_cpu(bundled_path):
    from app.compare import at_once
    from app.config import Settings
    from models.registry import ModelEntry

    a, b = (ModelEntry(n, str(bundled_path), "gguf") for n in ("a", "b"))
    remote = ModelEntry("r", "http://10.0.0.5:8000/v1", "remote", "remote")  # another machine
    size = bundled_path.stat().st_size
    on_gpu = Settings(gpu_layers=-1)
    assert at_once([a, b], on_gpu, offload=True, gpu_free=10 * size + (2 << 30))
    assert not at_once([a, b], on_gpu, offload=True, gpu_free=2 * size)  # no room for both
    assert not at_once([a, b], on_gpu, offload=False, gpu_free=10 << 30)  # a build without offload
    assert not at_once([a, b], Settings(gpu_layers=0), offload=True, gpu_free=10 << 30)  # CPU chosen
    assert not at_once([a, b], Settings(gpu_layers=20), offload=True, gpu_free=10 << 30)  # partly on the CPU
    assert not at_once([a, b], on_gpu, offload=True, gpu_free=None)  # no free figure: in turn
    assert at_once([a, remote], Settings(gpu_layers=0))  # the remote one needs no CPU here
    near = ModelEntry("n", "http://127.0.0.1:8000/v1", "remote", "remote")
    assert not at_once([a, near], Settings(gpu_layers=0))  # a server on this machine does
    assert not at_once([a], on_gpu, offload=True, gpu_free=10 << 30)
    # the chat's own model is in GPU memory already: only the other needs room
    assert at_once([a, b], on_gpu, offload=True, gpu_free=int(1.3 * size) + (600 << 20), resident="a")
    assert not at_once([a, b], on_gpu, offload=True, gpu_free=int(1.3 * size) + (600 << 20))
