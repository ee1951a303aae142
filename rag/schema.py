"""The document catalogue's SQLite schema, as an ordered list of named migrations.

Append-only: a migration once shipped is never edited. rag.sqlitedb runs them (with a
backup before an existing catalogue changes, and a refusal of a newer one).
"""
from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_initial", """
        CREATE TABLE collections (
            name TEXT PRIMARY KEY,
            embedder TEXT NOT NULL,
            dimension INTEGER NOT NULL,
            chunk_size INTEGER NOT NULL,
            chunk_overlap INTEGER NOT NULL,
            created REAL NOT NULL
        );
        CREATE TABLE files (
            collection TEXT NOT NULL REFERENCES collections(name) ON DELETE CASCADE,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
            reason TEXT,
            n_chunks INTEGER NOT NULL DEFAULT 0,
            ingested REAL NOT NULL,
            PRIMARY KEY (collection, path)
        );
        CREATE TABLE chunks (
            rowid INTEGER PRIMARY KEY,
            id TEXT NOT NULL,
            collection TEXT NOT NULL,
            path TEXT NOT NULL,
            idx INTEGER NOT NULL,
            page INTEGER,
            heading TEXT NOT NULL DEFAULT '',
            start INTEGER NOT NULL,
            "end" INTEGER NOT NULL,
            text TEXT NOT NULL,
            UNIQUE (collection, id),
            FOREIGN KEY (collection, path) REFERENCES files(collection, path) ON DELETE CASCADE
        );
        CREATE INDEX chunks_by_path ON chunks(collection, path);
        CREATE VIRTUAL TABLE chunks_fts USING fts5(
            text, heading, content='chunks', content_rowid='rowid',
            tokenize="unicode61 remove_diacritics 2 tokenchars '_'"
        );
        CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
            INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.rowid, new.text, new.heading);
        END;
        CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
            INSERT INTO chunks_fts(chunks_fts, rowid, text, heading) VALUES ('delete', old.rowid, old.text, old.heading);
        END;
    """),
    # Each chunk's document title (indexed for keyword search, own BM25 column) and the exact
    # context it was embedded with (NULL: its heading, as every chunk before this migration was).
    ("0002_chunk_title_context", """
        ALTER TABLE chunks ADD COLUMN title TEXT NOT NULL DEFAULT '';
        ALTER TABLE chunks ADD COLUMN context TEXT;
        DROP TRIGGER chunks_ai;
        DROP TRIGGER chunks_ad;
        DROP TABLE chunks_fts;
        CREATE VIRTUAL TABLE chunks_fts USING fts5(
            text, heading, title, content='chunks', content_rowid='rowid',
            tokenize="unicode61 remove_diacritics 2 tokenchars '_'"
        );
        CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
            INSERT INTO chunks_fts(rowid, text, heading, title) VALUES (new.rowid, new.text, new.heading, new.title);
        END;
        CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
            INSERT INTO chunks_fts(chunks_fts, rowid, text, heading, title)
                VALUES ('delete', old.rowid, old.text, old.heading, old.title);
        END;
        INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild');
    """),
    # Files by content, so an ingest finds a stored copy of a new file (Store.copies) in one lookup.
    ("0003_files_by_sha", """
        CREATE INDEX files_by_sha ON files(collection, sha256);
    """),
]
