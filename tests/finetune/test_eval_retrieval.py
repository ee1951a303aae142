"""Retrieval suites (finetune.evaluate.retrieval): recall@k and MRR over a real collection (the
bundled MiniLM embedder, Chroma and SQLite FTS5), exact metric math on hand-built rankings, and
questions files whose errors name the file and line."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from finetune.evaluate.retrieval import (
    Question,
    QuestionSet,
    load_questions,
    run_retrieval,
)
from finetune.evaluate.rows import EvalError

# Four short files (one chunk each) on topics far apart.
DOCS = {
    "bees.txt": "Beekeeping notes. A hive inspection every week in summer shows whether the queen is laying. "
                "Varroa mites weaken the colony; beekeepers treat varroa with oxalic acid in winter when "
                "the hive has no brood.",
    "volcano.txt": "Volcanoes. Magma rises through the crust and erupts as lava. Basalt lava is runny and "
                   "forms shield volcanoes such as Mauna Loa; sticky rhyolite magma builds steep cones "
                   "and explosive eruptions.",
    "sourdough.txt": "Sourdough baking. Feed the starter with flour and water the night before. Mix the "
                     "dough, fold it every half hour, then let it proof in the fridge overnight and bake "
                     "in a hot Dutch oven.",
    "chess.txt": "Chess openings. The Sicilian Defence answers 1.e4 with c5 and leads to sharp, "
                 "unbalanced games. The Queen's Gambit offers a pawn on c4 to gain control of the centre.",
}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """The four files ingested once into a real collection "eval"; yields (search, root)."""
    from rag.embed import Embedder
    from rag.ingest import Ingestor
    from rag.retrieve import Retriever
    from rag.store import Store

    root = tmp_path_factory.mktemp("eval-retrieval")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text + "\n", encoding="utf-8")
    embedder = Embedder(device="cpu")
    store = Store(root / "rag")
    Ingestor(store, lambda: embedder, embedder_name="all-MiniLM-L6-v2").run([docs], "eval")
    assert len(store.chunk_ids("eval")) == 4, "the test needs one chunk per file"
    retriever = Retriever(store, embedder)

    def search(question: str, mode: str, k: int) -> list[tuple[str, str]]:
        return [(h.source, h.text) for h in retriever.search("eval", question, k=k, mode=mode)]

    yield search, root
    store.close()


def write_questions(root, items) -> object:
    path = root / "topics.json"
    path.write_text(json.dumps(items, indent=2), encoding="utf-8")
    return path


def test_all_three_modes_over_a_real_collection(collection):
    search, root = collection
    path = write_questions(root, [
        {"question": "How do beekeepers treat varroa mites?", "source": "docs/bees.txt",
         "contains": "treat  VARROA with\noxalic acid"},          # case and whitespace ignored
        {"question": "What kind of lava forms shield volcanoes?", "source": "volcano.txt"},   # bare name
        {"question": "When should I feed my sourdough starter?", "source": "docs/../docs/sourdough.txt"},
        {"question": "Which opening answers e4 with c5?", "source": str(root / "docs" / "chess.txt")},
        {"question": "How do beekeepers treat varroa mites?", "source": "docs/bees.txt",
         "contains": "formic acid strips"},                      # in no passage: never found
    ])
    questions = load_questions(path)
    rows = run_retrieval(questions, search, k=5, model="all-MiniLM-L6-v2")
    assert [(r.task, r.metric) for r in rows] == [
        ("topics/dense", "recall@5"), ("topics/dense", "mrr"), ("topics/keyword", "recall@5"),
        ("topics/keyword", "mrr"), ("topics/hybrid", "recall@5"), ("topics/hybrid", "mrr")]
    assert all(r.suite == "retrieval" and r.model == "all-MiniLM-L6-v2" and r.n == 5 for r in rows)
    assert all(0.0 <= r.value <= 1.0 and r.stderr is not None and r.stderr >= 0 for r in rows)
    by = {(r.task, r.metric): r.value for r in rows}
    # Dense and hybrid return all four chunks within k=5: every answerable question is found,
    # which proves the real hits' source paths match the file-relative, bare and absolute forms.
    assert by[("topics/dense", "recall@5")] == pytest.approx(4 / 5)
    assert by[("topics/hybrid", "recall@5")] == pytest.approx(4 / 5)
    assert 0 < by[("topics/dense", "mrr")] <= 4 / 5


def test_keyword_mode_puts_the_only_file_with_the_terms_first(collection):
    search, root = collection
    only_bees = QuestionSet(root / "bees.json", (Question("oxalic acid against varroa", "docs/bees.txt"),))
    rows = run_retrieval(only_bees, search, modes=("keyword",), k=1)
    assert [(r.task, r.metric, r.value, r.n) for r in rows] == [
        ("bees/keyword", "recall@1", 1.0, 1), ("bees/keyword", "mrr", 1.0, 1)]
    assert all(r.stderr is None for r in rows), "one question has no spread to estimate"


def test_metric_math_is_exact_on_known_ranks(tmp_path):
    base = tmp_path / "docs"
    hits = {  # question -> what the search returns, best first
        "first": [(str(base / "a.txt"), "the answer is here")],                                   # rank 1
        "second": [(str(tmp_path / "other" / "b.txt"), "wrong folder"), (str(base / "b.txt"), "yes")],  # rank 2
        "none": [(str(base / "a.txt"), "not the file asked for")],                                  # no match
    }
    questions = [Question("first", "a.txt"), Question("second", "docs/b.txt"), Question("none", "docs/c.txt")]
    calls = []

    def search(question, mode, k):
        calls.append((question, mode, k))
        return hits[question]

    rows = run_retrieval(questions, search, modes=("dense",), k=5, name="known", base_dir=tmp_path)
    recall, mrr = rows
    assert (recall.task, recall.metric, recall.n) == ("known/dense", "recall@5", 3)
    assert recall.value == pytest.approx(2 / 3)
    assert recall.stderr == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))
    assert (mrr.metric, mrr.n) == ("mrr", 3)
    assert mrr.value == pytest.approx((1 + 0.5 + 0) / 3)
    assert mrr.stderr == pytest.approx(statistics.stdev([1, 0.5, 0]) / math.sqrt(3))
    assert calls == [("first", "dense", 5), ("second", "dense", 5), ("none", "dense", 5)]


def test_only_the_top_k_count_and_the_phrase_must_be_in_the_passage(tmp_path):
    target = str(tmp_path / "t.txt")
    seven = [(str(tmp_path / f"n{i}.txt"), "") for i in range(5)] + [(target, "x")]
    assert run_retrieval([Question("q", "t.txt")], lambda q, m, k: seven, modes=("m",), k=5,
                         base_dir=tmp_path)[0].value == 0.0, "a match at rank 6 is outside the top 5"
    assert run_retrieval([Question("q", "t.txt")], lambda q, m, k: seven, modes=("m",), k=6,
                         base_dir=tmp_path)[1].value == pytest.approx(1 / 6)
    phrase = [(target, "nothing useful"), (target, "Hold the\n  RESET button for ten seconds")]
    recall, mrr = run_retrieval([Question("q", "t.txt", contains="hold the reset button")],
                                lambda q, m, k: phrase, modes=("m",), base_dir=tmp_path)
    assert (recall.value, mrr.value) == (1.0, 0.5)


def test_relative_sources_are_read_from_the_questions_folder_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "suite").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "suite" / "q.jsonl"
    path.write_text('{"question": "q", "source": "docs/a.txt"}\n\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path / "elsewhere")
    here = str(tmp_path / "suite" / "docs" / "a.txt")
    cwd_relative = str(tmp_path / "elsewhere" / "docs" / "a.txt")
    assert run_retrieval(load_questions(path), lambda q, m, k: [(here, "")], modes=("m",))[0].value == 1.0
    assert run_retrieval(load_questions(path), lambda q, m, k: [(cwd_relative, "")], modes=("m",))[0].value == 0.0


BAD = {
    "invalid JSON": ("q.json", '[\n  {"question": "a", "source": "b"},\n  {"question": "c" "source": "d"}\n]\n',
                     3, "invalid JSON: Expecting ',' delimiter"),
    "missing source": ("q.json", ('[\n  {"question": "q1",\n   "source": "a.txt"},\n  {"question": "q2", '
                                 '"source": "b.txt"},\n  {\n    "question": "q3"\n  }\n]\n'),
                       5, 'item 3: "source" is missing'),
    "not a list": ("q.json", '\n\n{"question": "a", "source": "b"}\n', 3, "expected a list of questions, got a JSON dict"),
    "not an object": ("q.json", '[\n  {"question": "a", "source": "b"},\n  "c"\n]', 3,
                      'item 2: expected an object with "question" and "source", got a JSON str'),
    "source not a string": ("q.json", '[{"question": "a", "source": 3}]', 1,
                            'item 1: "source" must be a non-empty string'),
    "empty question": ("q.json", '[{"question": " ", "source": "b"}]', 1, 'item 1: "question" must be a non-empty'),
    "unknown field": ("q.json", '[\n {"question": "a", "source": "b", "contain": "c"}]', 2,
                      "item 1: unknown field 'contain' (choose question, source, contains)"),
    "no questions": ("q.json", "[]", 1, "no questions"),
    "JSONL bad line": ("q.jsonl", '{"question": "a", "source": "b"}\n\n{"question": \n', 3, "invalid JSON"),
    "JSONL missing question": ("q.jsonl", '{"question": "a", "source": "b"}\n{"source": "b"}\n', 2,
                               'item 2: "question" is missing'),
    "not UTF-8": ("q.json", b'[\n{"question": "caf\xe9", "source": "b"}]', 2, "not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_questions_files_name_the_file_and_line(tmp_path, case):
    name, content, line, message = BAD[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(EvalError) as err:
        load_questions(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: "), msg
    assert message in msg


def test_a_missing_questions_file_is_named(tmp_path):
    with pytest.raises(EvalError, match="nope.json: cannot read the questions"):
        load_questions(tmp_path / "nope.json")
