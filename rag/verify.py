"""Damage checks of the embedded Chroma store, run before Chroma opens it, and the rebuild.

Why before: Chroma 1.x (Rust) answers a zeroed HNSW file with an InternalError on the first
query, a missing segment folder with silently wrong results, and random bytes in
``data_level0.bin`` with a segfault that takes the whole app down. So the store reads the
files itself first (pure Python + numpy, no Chroma), and names the damaged file.

What is checked, for each vector segment whose index Chroma has persisted (a ``max_seq_id``
row; below ``hnsw:sync_threshold`` Chroma replays its SQLite log into a fresh index and the
files are not read):

- ``chroma.sqlite3``: ``PRAGMA quick_check`` (b-tree structure; a flipped byte inside a
  stored value is beyond what SQLite can see);
- ``header.bin``: hnswlib's header (format 1, 100 bytes: offsets, M, maxM0, element size
  = 4 + 4*maxM0 + 4*dim + 8), consistent with the collection's dimension;
- ``data_level0.bin``: big enough; every level-0 neighbour count <= maxM0 and id < count;
  vectors finite; not all zeros;
- ``length.bin``: one float32 vector length per element, finite and not all zero;
- ``link_lists.bin``: per element a u32 size and its upper-level lists, whole blocks, ids in range;
- ``index_metadata.pickle``: present, a pickle (protocol opcode first, STOP last; never unpickled).

The rebuild re-embeds a collection from the chunk texts kept in the catalogue (the source
of truth), so the files a collection was made from need not exist any more.
"""
from __future__ import annotations

import shutil
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path

# hnswlib saveIndex, as Chroma's fork writes it: format i32, then offsetLevel0, max_elements,
# cur_element_count, size_data_per_element, label_offset, offsetData (u64 each), maxlevel i32,
# enterpoint_node u32, maxM, maxM0, M (u64), mult f64, ef_construction u64.
_HEADER = struct.Struct("<iQQQQQQiIQQQdQ")
_FILES = ("header.bin", "data_level0.bin", "length.bin", "link_lists.bin", "index_metadata.pickle")


@dataclass(frozen=True)
class Damage:
    file: Path
    reason: str
    collection: str | None  # None: the whole Chroma store (its SQLite file)

    def line(self) -> str:
        return f"{self.file}: {self.reason}"


def check_chroma(chroma_dir: Path, prefix: str) -> list[Damage]:
    """Damage found in an embedded Chroma folder (empty when it is sound or not made yet)."""
    db_path = chroma_dir / "chroma.sqlite3"
    if not db_path.exists():
        return []
    try:
        db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return [Damage(db_path, f"cannot be opened ({exc})", None)]
    try:
        try:
            result = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
            if result != ["ok"]:
                return [Damage(db_path, "damaged (" + "; ".join(r.replace("\n", " ") for r in result) + ")", None)]
            rows = db.execute(
                "SELECT s.id, c.name, c.dimension FROM segments s JOIN collections c ON c.id = s.collection "
                "JOIN max_seq_id m ON m.segment_id = s.id WHERE s.scope = 'VECTOR' AND m.seq_id > 0").fetchall()
        except sqlite3.Error as exc:
            return [Damage(db_path, f"damaged ({exc})", None)]
    finally:
        db.close()
    out = []
    for seg, name, dim in rows:
        coll = name.removeprefix(prefix)
        reason, file = _check_segment(chroma_dir / seg, dim)
        if reason:
            out.append(Damage(file, reason, coll))
    return out


def _check_segment(seg: Path, dim: int | None) -> tuple[str | None, Path]:
    for name in _FILES:
        if not (seg / name).is_file():
            return "missing (the vector index of a persisted segment)", seg / name
    raw = (seg / "header.bin").read_bytes()
    if len(raw) != _HEADER.size or not any(raw):
        return f"not an HNSW header ({len(raw)} bytes{', all zero' if raw and not any(raw) else ''})", seg / "header.bin"
    (fmt, off0, max_el, count, size, label_off, data_off, maxlevel, enter, max_m, max_m0, m, _mult,
     _ef) = _HEADER.unpack(raw)
    if fmt != 1:
        return None, seg  # a format this check does not know: leave it to Chroma
    sane = (off0 == 0 and 2 <= m <= 4096 and max_m == m and max_m0 == 2 * m and data_off == 4 + 4 * max_m0
            and label_off > data_off and size == label_off + 8 and count <= max_el and 0 <= maxlevel < 64
            and (dim is None or label_off == data_off + 4 * dim)
            and (enter < count if count else enter == 0xFFFFFFFF))
    if not sane:
        return "inconsistent HNSW header", seg / "header.bin"
    import numpy as np

    level0 = (seg / "data_level0.bin").read_bytes()
    if len(level0) < count * size:
        return f"truncated ({len(level0)} bytes, {count} elements need {count * size})", seg / "data_level0.bin"
    rows = np.frombuffer(level0, dtype=np.uint8, count=count * size).reshape(count, size)
    if count and not rows.any():
        return "all zero", seg / "data_level0.bin"
    if _bad_lists(rows[:, :data_off], max_m0, count):
        return "damaged neighbour lists", seg / "data_level0.bin"
    vectors = np.ascontiguousarray(rows[:, data_off:label_off]).view("<f4")
    if not np.isfinite(vectors).all():
        return "damaged vectors (NaN or infinite values)", seg / "data_level0.bin"
    norms_raw = (seg / "length.bin").read_bytes()
    if len(norms_raw) < 4 * count:
        return f"truncated ({len(norms_raw)} bytes, {count} vector lengths need {4 * count})", seg / "length.bin"
    norms = np.frombuffer(norms_raw, dtype="<f4", count=count)
    if not (np.isfinite(norms).all() and (norms >= 0).all()) or (count and not norms.any()):
        return "damaged vector lengths", seg / "length.bin"
    reason = _check_upper_levels((seg / "link_lists.bin").read_bytes(), count, max_m, maxlevel)
    if reason:
        return reason, seg / "link_lists.bin"
    pickle = (seg / "index_metadata.pickle").read_bytes()
    if len(pickle) < 2 or pickle[0] != 0x80 or pickle[-1:] != b".":
        return "not a pickle written by Chroma", seg / "index_metadata.pickle"
    return None, seg


def _check_upper_levels(links: bytes, count: int, max_m: int, maxlevel: int) -> str | None:
    """hnswlib writes, per element, a u32 byte size and then that many bytes of level lists."""
    import numpy as np

    block, pos, blocks = 4 + 4 * max_m, 0, []
    for _ in range(count):
        if pos + 4 > len(links):
            return f"truncated ({len(links)} bytes)"
        size, = struct.unpack_from("<I", links, pos)
        if size % block or size // block > maxlevel or pos + 4 + size > len(links):
            return "damaged level sizes"
        if size:
            blocks.append(links[pos + 4:pos + 4 + size])
        pos += 4 + size
    if blocks and _bad_lists(np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(-1, block), max_m, count):
        return "damaged neighbour lists"
    return None


def _bad_lists(lists, max_links: int, count: int) -> bool:
    """Rows of [u32 count (low 16 bits), max_links u32 ids]: a count or id out of range."""
    import numpy as np

    if len(lists) == 0:
        return False
    ints = np.ascontiguousarray(lists).view("<u4")
    n = ints[:, 0] & 0xFFFF
    if (n > max_links).any():
        return True
    used = np.arange(max_links)[None, :] < n[:, None]
    return bool((ints[:, 1:1 + max_links][used] >= count).any())


def set_aside(path: Path) -> Path:
    """Move a damaged file or folder out of the way (kept for inspection, never deleted)."""
    dest = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    shutil.move(str(path), str(dest))
    return dest


def rebuild(store, name: str, encode, batch: int = 256) -> int:
    """Drop a collection's vectors and re-embed its chunk texts from the catalogue; the count.

    `encode(texts) -> vectors` is the collection's embedder (the one recorded in the catalogue)."""
    from .chunking import Chunk

    store.require(name)
    ids = store.chunk_ids(name)
    chunks = store.chunks(name, ids)
    store.reset_vectors(name)
    done = 0
    for i in range(0, len(ids), batch):
        part = [chunks[c] for c in ids[i:i + batch]]
        texts = [Chunk(c.idx, c.start, c.end, c.text, c.heading, c.page, c.context).embedding_text() for c in part]
        store.add_vectors(name, [c.id for c in part], encode(texts), [c.path for c in part])
        done += len(part)
    return done


def damage_message(damage: list[Damage]) -> str:
    whole = any(d.collection is None for d in damage)
    names = sorted({d.collection for d in damage if d.collection})
    cmd = "crofter collections rebuild" + ("" if whole else " " + " ".join(names))
    return ("the document store is damaged: " + "; ".join(d.line() for d in damage)
            + f"; run `{cmd}` to re-embed {'every collection' if whole else 'it'} from the catalogue")


def repair(store, names: list[str], encoder) -> list[tuple[str, int]]:
    """Rebuild the named collections (all when empty) of a store opened with ``repair=True``.

    A damaged chroma.sqlite3 or a lost catalogue WAL rebuilds every collection in a fresh
    Chroma folder (the old one is set aside). `encoder(embedder_name)` gives an encode function."""
    damage = store.check()
    whole = store.lost_catalogue_wal or any(d.collection is None for d in damage)
    every = [c.name for c in store.collections()]
    if whole and not store.chroma_url:
        if (store.root / "chroma").exists():
            from chromadb.api.shared_system_client import SharedSystemClient

            # Chroma keeps one client per path per process; it must not follow the moved files.
            SharedSystemClient.clear_system_cache()
            set_aside(store.root / "chroma")
        names = every
    names = names or every
    for name in names:
        store.require(name)
    done = [(name, rebuild(store, name, encoder(store.require(name).embedder))) for name in names]
    for d in damage:  # Chroma has dropped these segments; their damaged folders are left behind
        seg = d.file.parent
        if d.collection in names and seg.parent == store.root / "chroma" and seg.is_dir():
            shutil.rmtree(seg, ignore_errors=True)
    return done
