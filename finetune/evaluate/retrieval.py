"""Retrieval suite: does the search find the passage a question needs? recall@k and MRR.

A questions file is JSON, a list of objects (or JSONL, one object per line, for `.jsonl`)::

    [{"question": "How do I reset the router?", "source": "manuals/router.md",
      "contains": "hold the reset button"}]

`source` is the file that answers it, relative to the questions file's folder (or absolute); a
bare file name (no folder) also matches any hit whose file has that name. `contains`, if given,
must appear in the hit's passage too (case and runs of whitespace ignored). The search is a
callable, so this module needs nothing from `rag`::

    rows = run_retrieval(load_questions("q.json"), lambda q, mode, k: [(h.source, h.text)
                         for h in retriever.search("docs", q, k=k, mode=mode)])

Only the top k hits count, so `mrr` is MRR@k: mean 1/rank of the first matching hit, 0 when none
matches (Voorhees, TREC-8 QA track, 1999).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .rows import EvalError, Row, mean_stderr, read_input

FIELDS = ("question", "source", "contains")
MAX_QUESTIONS_BYTES = 50 * 1024 * 1024
Search = Callable[[str, str, int], "list[tuple[str, str]]"]


@dataclass(frozen=True)
class Question:
    question: str
    source: str
    contains: str | None = None
    line: int = 0  # 1-based line where the item starts in its file (0: built in code)


@dataclass(frozen=True)
class QuestionSet:
    """The questions of one file; `path` names the task and anchors relative sources."""

    path: Path
    questions: tuple[Question, ...]

    @property
    def name(self) -> str:
        return self.path.stem

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)


def load_questions(path: str | os.PathLike) -> QuestionSet:
    """Read a questions file; errors name the file, the line and the field:
    ``q.json:7: item 3: "source" is missing`` (items count from 1)."""
    path = Path(path)
    text = read_input(path, "questions", MAX_QUESTIONS_BYTES)
    raw = _jsonl_items(path, text) if path.suffix.lower() == ".jsonl" else _json_items(path, text)
    if not raw:
        raise EvalError(f"{path}:1: no questions: the file needs at least one")
    return QuestionSet(path, tuple(_question(path, i, line, obj) for i, (line, obj) in enumerate(raw, 1)))


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_items(path: Path, text: str) -> list[tuple[int, object]]:
    """(line where the item starts, item) for each element of the top-level list."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise EvalError(f"{path}:1: invalid JSON: nested too deeply") from None
    start = len(text) - len(text.lstrip())
    if not isinstance(doc, list):
        raise EvalError(f"{path}:{_line_of(text, start)}: expected a list of questions, got a JSON "
                        f"{type(doc).__name__}")
    # The text is valid JSON, so walking the list element by element with raw_decode cannot fail:
    # it only finds where each element starts.
    decoder, out, pos = json.JSONDecoder(), [], start + 1
    for _ in doc:
        pos = _skip(text, pos, ",")
        item, end = decoder.raw_decode(text, pos)
        out.append((_line_of(text, pos), item))
        pos = end
    return out


def _skip(text: str, pos: int, separators: str) -> int:
    """Past whitespace and at most one of `separators`, then whitespace again."""
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    if pos < n and text[pos] in separators:
        pos += 1
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _jsonl_items(path: Path, text: str) -> list[tuple[int, object]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise EvalError(f"{path}:{n}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise EvalError(f"{path}:{n}: invalid JSON: nested too deeply") from None
    return out


def _question(path: Path, i: int, line: int, obj) -> Question:
    where = f"{path}:{line}: item {i}"
    if not isinstance(obj, dict):
        raise EvalError(f"{where}: expected an object with \"question\" and \"source\", got a JSON "
                        f"{type(obj).__name__}")
    for key in obj:
        if key not in FIELDS:
            raise EvalError(f"{where}: unknown field {key!r} (choose {', '.join(FIELDS)})")
    values = {}
    for key in FIELDS:
        if key not in obj:
            if key == "contains":
                continue
            raise EvalError(f"{where}: {json.dumps(key)} is missing")
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            raise EvalError(f"{where}: {json.dumps(key)} must be a non-empty string")
        if "\0" in value:
            raise EvalError(f"{where}: {json.dumps(key)} contains a NUL character")
        values[key] = value
    return Question(values["question"], values["source"], values.get("contains"), line)


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


class _Matcher:
    """Decides whether a hit (source, passage) answers a question; resolves each path once."""

    def __init__(self, base_dir: Path):
        self.base = base_dir
        self._resolved: dict[str, str] = {}

    def _abs(self, p: str, base: Path | None = None) -> str:
        key = f"{base}\0{p}"
        if key not in self._resolved:
            q = Path(p).expanduser()
            self._resolved[key] = str(((base / q) if base is not None and not q.is_absolute() else q).resolve())
        return self._resolved[key]

    def matches(self, q: Question, source: str | Sequence[str], passage: str) -> bool:
        """`source`: the hit's file, or every file its passage is in (a passage found in several
        copies is one hit that names them all)."""
        bare = os.sep not in q.source and "/" not in q.source
        same = any((bare and Path(s).name == q.source) or self._abs(s) == self._abs(q.source, self.base)
                   for s in ([source] if isinstance(source, str) else source))
        return same and (q.contains is None or _norm(q.contains) in _norm(passage))

    def rank(self, q: Question, hits: Sequence[tuple[str, str]], k: int) -> int | None:
        """1-based rank of the first matching hit among the top k, None if none matches."""
        for r, (source, passage) in enumerate(list(hits)[:k], 1):
            if self.matches(q, source, passage):
                return r
        return None


def run_retrieval(questions: QuestionSet | Sequence[Question], search: Search,
                  modes: Sequence[str] = ("dense", "keyword", "hybrid"), k: int = 5, name: str | None = None,
                  base_dir: str | os.PathLike | None = None, model: str = "",
                  on_question: Callable[[str, int, int], None] | None = None) -> list[Row]:
    """recall@k and MRR of `search(question, mode, k) -> [(source, passage), ...]` (best first)
    for each mode: rows with suite "retrieval", task f"{name}/{mode}", n = number of questions.

    `name` defaults to the questions file's stem ("questions" for a plain list), `base_dir` to
    its folder (the working directory for a plain list). `model` fills `Row.model` (the CLI may
    pass the collection or embedder name). `on_question(mode, i, n)` follows each search."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if not modes:
        raise ValueError("give at least one mode")
    qs = tuple(questions)
    if not qs:
        raise ValueError("no questions")
    is_set = isinstance(questions, QuestionSet)
    name = name or (questions.name if is_set else "questions")
    base = Path(base_dir) if base_dir is not None else (questions.path.parent if is_set else Path.cwd())
    matcher = _Matcher(base.resolve())
    rows: list[Row] = []
    for mode in modes:
        ranks = []
        for i, q in enumerate(qs, 1):
            ranks.append(matcher.rank(q, search(q.question, mode, k), k))
            if on_question is not None:
                on_question(mode, i, len(qs))
        found = [1.0 if r is not None else 0.0 for r in ranks]
        reciprocal = [1.0 / r if r is not None else 0.0 for r in ranks]
        task = f"{name}/{mode}"
        rows.append(Row(model, "retrieval", task, f"recall@{k}", sum(found) / len(qs), mean_stderr(found), len(qs)))
        rows.append(Row(model, "retrieval", task, "mrr", sum(reciprocal) / len(qs), mean_stderr(reciprocal), len(qs)))
    return rows
