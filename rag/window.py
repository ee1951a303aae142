"""Small chunks to match, a wider passage to show: each hit widened to its neighbours.

Chunks are cut small (128 tokens) so that a query's best match is sharp, but the sentence that
answers a question is often the one beside the sentence that matches it. A hit is therefore
shown with up to `window` chunks either side of it from the same file (and page), as long as
they join it without a gap, so its text stays exactly `extracted[start:end]`: the span a
citation shows and `crofter verify` checks. A later hit that falls inside a passage already
shown is dropped, and a window never takes in chunks an earlier one shows, so no text is
listed twice and the freed slots go to the next distinct passages.
"""
from __future__ import annotations

from dataclasses import replace

from .store import Store, chunk_id


def widen(store: Store, collection: str, hits: list, window: int, k: int, chars: int = 1 << 30,
          key=None) -> list:
    """The first `k` distinct passages of `hits` (best first, an order widening keeps), each
    widened by up to `window` chunks either side while it stays within `chars` characters.
    `key(text)` names a passage (retrieve.passage_key): a chunk whose copy was already shown,
    in another file too, is neither shown again nor taken into a window. A hit's `also` keeps
    naming where its own chunk's copies are."""
    if window < 1 or not hits:
        return hits[:k]
    hits = hits[: k * (2 * window + 1)]  # enough for k passages, however many fall inside others
    own = store.chunks(collection, [h.id for h in hits])
    shas: dict[str, str | None] = {}
    wanted: list[str] = []
    for r in own.values():
        if r.path not in shas:
            rec = store.file(collection, r.path)
            shas[r.path] = rec.sha256 if rec is not None else None
        if shas[r.path] is not None:
            wanted += [chunk_id(r.path, shas[r.path], i) for i in range(r.idx - window, r.idx + window + 1)
                       if i >= 0 and i != r.idx]
    by_pos = {(c.path, c.idx): c for c in [*own.values(), *store.chunks(collection, wanted).values()]}
    shown: dict[str, set[int]] = {}
    seen_keys: set[str] = set()
    name = key or (lambda text: text)
    out = []
    for h in hits:
        r = own.get(h.id)
        if r is None:  # not in the catalogue (cannot happen for hits from search): as it is
            out.append(h)
        elif r.idx not in shown.setdefault(r.path, set()) and name(r.text) not in seen_keys:
            taken = shown[r.path]

            def joins(a, b):
                """Chunk b continues chunk a on the same page without a gap, their overlap the
                same text (not two versions of a file re-ingested in between)."""
                return (a is not None and b is not None and a.page == b.page and a.start <= b.start <= a.end
                        and a.text[b.start - a.start:] == b.text[:a.end - b.start])

            def fresh(c):  # not shown yet, here or as a copy in another file
                return c is not None and name(c.text) not in seen_keys

            lo = hi = r.idx
            grew = True
            while grew:  # one chunk after, then one before, while the passage stays within `chars`
                grew = False
                nxt = by_pos.get((r.path, hi + 1))
                if hi - r.idx < window and hi + 1 not in taken and fresh(nxt) and joins(by_pos[(r.path, hi)], nxt) \
                        and nxt.end - by_pos[(r.path, lo)].start <= chars:
                    hi, grew = hi + 1, True
                prv = by_pos.get((r.path, lo - 1))
                if r.idx - lo < window and lo - 1 not in taken and fresh(prv) and joins(prv, by_pos[(r.path, lo)]) \
                        and by_pos[(r.path, hi)].end - prv.start <= chars:
                    lo, grew = lo - 1, True
            parts = [by_pos[(r.path, i)] for i in range(lo, hi + 1)]
            text = parts[0].text + "".join(b.text[a.end - b.start:] for a, b in zip(parts, parts[1:]))
            start, end = parts[0].start, parts[-1].end
            # Chunks overlap: where a shown passage ends (or starts) inside this one, cut it there.
            before, after = by_pos.get((r.path, lo - 1)), by_pos.get((r.path, hi + 1))
            if lo - 1 in taken and before is not None and start < before.end < r.end and before.page == r.page:
                text, start = text[before.end - start:], before.end
            if hi + 1 in taken and after is not None and r.start < after.start < end and after.page == r.page:
                text, end = text[:after.start - start], after.start
            taken.update(range(lo, hi + 1))
            seen_keys.update(name(c.text) for c in parts)
            out.append(replace(h, start=start, end=end, text=text))
        if len(out) == k:
            break
    return out
