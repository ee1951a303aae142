"""Widening hits to their neighbouring chunks (rag/window.py), over a store the test fills by
hand: chunks of 50 characters every 40 (10 overlap), so every edge case is placed exactly."""
from __future__ import annotations

import pytest

from rag.chunking import Chunk
from rag.retrieve import Hit, passage_key
from rag.store import FileRecord, Store, chunk_id
from rag.window import widen

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _text(seed: int, n: int = 400) -> str:
    out, i = [], seed
    while sum(len(w) + 1 for w in out) < n:
        out.append(WORDS[i % len(WORDS)] + str(i))
        i += 7
    return " ".join(out)[:n]


def _chunks(text: str, pages=None, gap_after=None) -> list[Chunk]:
    chunks, start, i = [], 0, 0
    while start < len(text) - 10:
        end = min(start + 50, len(text))
        chunks.append(Chunk(i, start, end, text[start:end], page=pages(i) if pages else None))
        start += 40 + (15 if gap_after is not None and i == gap_after else 0)
        i += 1
    return chunks


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "rag")
    s.create_collection("c", "test", 4, 50, 10)
    yield s
    s.close()


def _add(store, path: str, text: str, **kw) -> tuple[str, list[Chunk]]:
    chunks = _chunks(text, **kw)
    sha = f"{abs(hash((path, text))):064d}"[:64]
    store.write_files("c", [(FileRecord(path, sha, len(text), 0, "ok", None, len(chunks)), chunks,
                             [[1.0, 0.0, 0.0, 0.0]] * len(chunks))])
    return sha, chunks


def _hit(path, sha, c: Chunk, score: float) -> Hit:
    return Hit(path, c.page, "", c.start, c.end, c.text, score, chunk_id(path, sha, c.index))


def test_neighbours_join_trim_and_nothing_is_shown_twice(store):
    text = _text(1)
    sha, ch = _add(store, "/d/a.txt", text)
    hits = [_hit("/d/a.txt", sha, ch[5], 3.0), _hit("/d/a.txt", sha, ch[7], 2.0), _hit("/d/a.txt", sha, ch[6], 1.0)]
    out = widen(store, "c", hits, window=1, k=3, key=passage_key)
    first, second = out[0], out[1]
    assert (first.start, first.end) == (ch[4].start, ch[6].end)  # 4..6 around 5
    # 7's window starts where the shown passage ends (chunk 6 is taken; their overlap is cut)
    assert (second.start, second.end) == (ch[6].end, ch[8].end)
    assert len(out) == 2  # 6 lies inside the first passage: dropped, no third to take its place
    for h in out:
        assert text[h.start:h.end] == h.text


def test_a_page_break_a_gap_and_the_character_cap_stop_a_window(store):
    text = _text(2)
    sha, ch = _add(store, "/d/p.txt", text, pages=lambda i: 1 if i < 3 else 2)
    (h,) = widen(store, "c", [_hit("/d/p.txt", sha, ch[3], 1.0)], window=2, k=1, key=passage_key)
    assert (h.start, h.end) == (ch[3].start, ch[5].end)  # nothing from page 1
    sha2, ch2 = _add(store, "/d/g.txt", _text(3), gap_after=4)
    (g,) = widen(store, "c", [_hit("/d/g.txt", sha2, ch2[4], 1.0)], window=2, k=1, key=passage_key)
    assert (g.start, g.end) == (ch2[2].start, ch2[4].end)  # chunk 5 starts after a gap
    (c,) = widen(store, "c", [_hit("/d/p.txt", sha, ch[6], 1.0)], window=3, k=1, chars=100, key=passage_key)
    assert c.end - c.start <= 100 and c.start <= ch[6].start and ch[6].end <= c.end and c.end - c.start >= 90


def test_a_copy_in_another_file_is_not_shown_again_and_a_stray_hit_passes(store):
    text = _text(4)
    sha_a, ch = _add(store, "/d/a.txt", text)
    sha_b, _ = _add(store, "/d/copy/a.txt", text)
    stray = Hit("/d/x.txt", None, "", 0, 5, "stray", 0.5, "no-such-id")
    hits = [_hit("/d/a.txt", sha_a, ch[5], 3.0), _hit("/d/copy/a.txt", sha_b, ch[6], 2.9), stray]
    out = widen(store, "c", hits, window=1, k=3, key=passage_key)
    assert [h.source for h in out] == ["/d/a.txt", "/d/x.txt"]  # the copy's chunk 6 was shown in a's window
    assert out[1] is stray


def test_a_file_re_ingested_between_search_and_widening_is_not_spliced(store):
    text = _text(5)
    sha, ch = _add(store, "/d/v.txt", text)
    hit = _hit("/d/v.txt", sha, ch[5], 1.0)
    changed = text[:ch[6].start] + text[ch[6].start:].upper()  # the file changed from chunk 6 on
    # the catalogue now names the new version (same path, another sha): chunk 5 of the old one is the hit
    store.write_files("c", [(FileRecord("/d/v.txt", sha, len(text), 0, "ok", None, len(ch)), ch,
                             [[1.0, 0.0, 0.0, 0.0]] * len(ch))])
    new = _chunks(changed)
    rows = [(c, chunk_id("/d/v.txt", sha, c.index)) for c in new]
    store.db.execute("UPDATE chunks SET text = ? WHERE id = ?", (rows[6][0].text, rows[6][1]))
    (h,) = widen(store, "c", [hit], window=1, k=1, key=passage_key)
    assert (h.start, h.end) == (ch[4].start, ch[5].end)  # chunk 6 no longer joins chunk 5's text
    assert h.text == text[h.start:h.end]
