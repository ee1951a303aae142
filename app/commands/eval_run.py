"""The work behind `crofter eval`: each model through each asked-for suite, one at a
time (one model in memory, plus the reference or the judge when asked for)."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ..errors import CLIError


class Runner:
    def __init__(self, args):
        from .. import config

        self.args = args
        self.settings = config.load().replace(temperature=0.0, seed=0, gpu_layers=args.gpu_layers)
        self.text = None
        if args.text:
            from .evaluate import read_text

            self.text = read_text(args.text)
        self.tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        self.local_tasks = None
        if self.tasks:
            from finetune.evaluate.tasks import local_tasks

            self.local_tasks = local_tasks(args.include_path)  # bad task files fail before any model loads
        self.suite = None
        if args.prompts:
            from finetune.evaluate.prompts import load_suite

            self.suite = load_suite(args.prompts)
        self.questions = None
        if args.retrieval:
            from finetune.evaluate.retrieval import load_questions

            self.questions = load_questions(args.retrieval)
        self._reference = None
        self._judge = None
        self.answers: dict[str, Path] = {}

    # -- per model -----------------------------------------------------------------------
    def evaluate(self, t) -> list:
        rows = []
        if self.text is not None:
            rows += self._perplexity(t)
        if self.tasks:
            rows += self._tasks(t)
        if self.suite is not None:
            rows += self._prompts(t)
        if self.args.speed:
            from finetune.evaluate.speed import measure, speed_rows

            rows += speed_rows(t.label, measure(t.path, t.adapter, gpu_layers=self.args.gpu_layers))
        return rows

    def _scorer(self, t, n_ctx: int):
        from finetune.evaluate.scorer import open_scorer

        return open_scorer(t.path, t.adapter, n_ctx=n_ctx, gpu_layers=self.args.gpu_layers)

    def _perplexity(self, t) -> list:
        from finetune.evaluate.perplexity import perplexity

        text, name = self.text
        ref = self._reference_scorer()
        scorer = self._scorer(t, self.args.ctx)
        try:
            with self._bar(f"perplexity {t.label}", "windows") as tick:
                result = perplexity(scorer, text, self.args.ctx, reference=ref, max_windows=self.args.max_windows,
                                    on_window=lambda i, n: tick(i, n, ""))
        finally:
            scorer.close()
        return result.rows(t.label, name)

    def _reference_scorer(self):
        if not self.args.reference:
            return None
        if self._reference is None:
            from .evaluate import _targets

            (ref,) = _targets([self.args.reference], None)
            self._reference = self._scorer(ref, self.args.ctx)
        return self._reference

    def _tasks(self, t) -> list:
        from finetune.evaluate.tasks import run_tasks

        _quiet_lm_eval()
        if t.kind == "gguf":
            from finetune.evaluate.llama_lm import CrofterLM

            scorer = self._scorer(t, self.args.task_ctx)
            lm = CrofterLM(scorer)
        else:
            from finetune.evaluate.hf_lm import hf_lm

            scorer = None
            lm = hf_lm(t.path, adapter=t.adapter, max_length=self.args.task_ctx)
        try:
            with self._bar(f"tasks {t.label}", "requests") as tick:
                lm.on_progress = tick
                return run_tasks(lm, self.tasks, t.label, self.args.include_path, limit=self.args.limit,
                                 num_fewshot=self.args.num_fewshot, local=self.local_tasks).rows
        finally:
            if scorer is not None:
                scorer.close()

    def _prompts(self, t) -> list:
        from finetune.evaluate.prompts import run_suite
        from models import paths

        from . import eval_turns

        if t.kind != "gguf":
            raise CLIError(f"{t.label}: prompt suites run through the chat, which needs a GGUF "
                           "(crofter convert, then evaluate the GGUF)")
        store = {}

        def store_for():
            if "s" not in store:
                from .. import documents

                s = self.settings.replace(chroma_url=self.args.chroma_url) if self.args.chroma_url else self.settings
                store["s"] = documents.open_store(s)
            return store["s"]

        engine = eval_turns.load_engine(t.entry, self.settings, t.adapter)
        try:
            answer = eval_turns.suite_answer(engine, self.settings, store_for, self.args.allow_tool, self.args.yes)
            judge = self._judge_for(engine, t)
            with self._bar(f"prompts {t.label}", "prompts") as tick:
                result = run_suite(self.suite, answer, judge=judge, on_item=lambda i, n, _r: tick(i, n, ""))
        finally:
            engine.close()
            if "s" in store:
                store["s"].close()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = paths.data_dir() / "eval" / "answers" / f"{stamp}-{_slug(t.label)}-{_slug(self.suite.name)}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        result.write_answers(out)
        self.answers[t.label] = out
        return result.rows(t.label)

    def _judge_for(self, engine, t):
        from . import eval_turns

        if not self.args.judge:
            return None
        from .evaluate import _targets

        (j,) = _targets([self.args.judge], None)
        if j.path == t.path and t.adapter is None:  # the judge is the model itself, never its adapter
            return eval_turns.grammar_judge(engine)
        if self._judge is None:
            self._judge = eval_turns.load_engine(j.entry, self.settings)
        return eval_turns.grammar_judge(self._judge)

    # -- once ----------------------------------------------------------------------------
    def retrieval(self) -> tuple[str, list]:
        from finetune.evaluate.retrieval import run_retrieval

        from .. import documents
        from . import eval_turns

        s = self.settings.replace(chroma_url=self.args.chroma_url) if self.args.chroma_url else self.settings
        if self.args.reranker is not None:
            s = s.replace(reranker=self.args.reranker)
        label = f"collection:{self.args.collection}"
        name = s.reranker.strip()
        if name.lower() not in ("", "none"):  # a store name as it is, a folder by its whole path: never two alike
            folder = Path(name).expanduser()
            label += f"+{folder.resolve() if folder.exists() else name}"
        with documents.open_store(s) as store:
            search = eval_turns.retrieval_search(store, s, self.args.collection)
            rows = run_retrieval(self.questions, search, k=self.args.k, name=Path(self.args.retrieval).stem,
                                 model=label)
        return label, rows

    def store(self, targets, columns) -> None:
        from finetune.evaluate.results import ResultStore

        from .. import __version__

        rs = ResultStore()
        hashes = {t.label: rs.hash_of(t.path, t.adapter) for t in targets}
        for label, _ in columns:
            hashes.setdefault(label, label)
        extra = {k: getattr(self.args, k) for k in ("ctx", "limit", "num_fewshot", "task_ctx", "k")}
        extra["answers"] = {k: str(v) for k, v in self.answers.items()}
        rs.add([r for _, rows in columns for r in rows], hashes, __version__, extra=extra)

    def close(self) -> None:
        for m in (self._reference, self._judge):
            if m is not None:
                m.close()

    @contextlib.contextmanager
    def _bar(self, label: str, unit: str):
        from .evaluate import progress_bar

        bar = progress_bar(self.args, label)
        if bar is None:
            yield lambda done, total, what: None
            return
        now = time.monotonic()
        clock = {"what": None, "t0": now, "last": now}
        with bar:
            task = bar.add_task(label, total=None, rate="", what="")

            def tick(done: int, total: int, what: str) -> None:
                now = time.monotonic()
                if what != clock["what"]:  # each kind of request counts from 0, timed from the last one's end
                    clock.update(what=what, t0=clock["last"])
                    bar.reset(task, total=total)
                clock["last"] = now
                rate = done / max(now - clock["t0"], 1e-9)
                bar.update(task, completed=done, total=total, rate=f"{rate:.1f} {unit}/s", what=what)

            yield tick


def _quiet_lm_eval() -> None:
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lm_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import datasets
    import lm_eval.evaluator

    datasets.disable_progress_bars()

    # lm-eval records `git describe` of the current folder, which is the user's, not the
    # evaluation's, and prints git's "fatal: not a git repository" outside one.
    lm_eval.evaluator.get_git_commit_hash = lambda: None


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)[:60]
