"""`crofter ingest`, `crofter collections list|info|rm|rebuild` and `crofter search`."""
from __future__ import annotations

import json
import sys
import time

from ..errors import CLIError


def _settings(args):
    from .. import config

    s = config.load()
    url = getattr(args, "chroma_url", None)
    s = s.replace(chroma_url=url) if url else s
    rer = getattr(args, "reranker", None)
    return s.replace(reranker=rer) if rer is not None else s


def _console():
    from rich.console import Console

    # File names and document text are shown literally, never read as markup.
    return Console(stderr=True, markup=False, highlight=False)


def run_ingest(args) -> int:
    from .. import documents

    settings = _settings(args)
    if args.chunk_size is not None and args.chunk_size < 8:
        raise CLIError("--chunk-size must be at least 8 tokens")
    with documents.open_store(settings) as store:
        kw = {}
        if args.chunk_size:
            kw["chunk_size"] = args.chunk_size
        if args.chunk_overlap is not None:
            kw["chunk_overlap"] = args.chunk_overlap
        ing = documents.ingestor(store, settings, args.collection, embedder_name=args.embedder, **kw)
        from rag.watch import Snapshot

        # Taken before each pass, so a file that changes while a pass runs is seen by the next one.
        snap = Snapshot(args.paths) if args.watch else None
        summary = _ingest_once(ing, args)
        if not args.watch:
            return 0 if summary.ingested or summary.unchanged or not summary.failed else 1
        print(f"crofter: watching {', '.join(args.paths)} for changes (Ctrl+C to stop)", file=sys.stderr)
        try:
            while True:
                time.sleep(args.interval)
                if snap.changed():
                    snap = Snapshot(args.paths)
                    _ingest_once(ing, args)
        except KeyboardInterrupt:
            return 0


def _ingest_once(ing, args):
    quiet = args.json or not sys.stderr.isatty()
    if quiet:
        summary = ing.run(args.paths, args.collection)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            BarColumn(), MofNCompleteColumn(), TextColumn("files"),
            TextColumn("{task.fields[chunks]} chunks  {task.fields[rate]:.1f} chunks/s"), TimeRemainingColumn(),
            TextColumn("{task.fields[current]}", markup=False),
        )
        with Progress(*columns, console=_console(), transient=True) as bar:
            task = bar.add_task("ingest", total=None, chunks=0, rate=0.0, current="")

            def show(p):
                name = p.current.rsplit("/", 1)[-1][:40]
                bar.update(task, total=p.files_total, completed=p.files_done, chunks=p.chunks, rate=p.chunks_per_s,
                           current=name)

            summary = ing.run(args.paths, args.collection, on_progress=show)
    if args.json:
        print(json.dumps(summary.as_dict(), ensure_ascii=False), flush=True)
    else:
        con = _console()
        con.print(f"{args.collection}: ingested {len(summary.ingested)} files ({summary.chunks} chunks), "
                  f"{len(summary.unchanged)} unchanged, {len(summary.failed)} failed, {len(summary.removed)} removed "
                  f"in {summary.seconds:.1f} s" + (f" (embedder on {summary.backend})" if summary.backend else ""),
                  soft_wrap=True)
        from ..render import display_safe

        if summary.fallback:
            con.print(f"  note: {display_safe(summary.fallback)}; ran {summary.backend} instead", soft_wrap=True)

        for path, reason in summary.failed:
            con.print(f"  failed: {display_safe(path)}: {display_safe(reason)}")
        for path in summary.removed:
            con.print(f"  removed: {display_safe(path)}")
    return summary


def run_collections(args) -> int:
    from .. import documents

    settings = _settings(args)
    if args.collections_command == "rebuild":
        return _rebuild(settings, list(getattr(args, "names", None) or []))
    with documents.open_store(settings) as store:
        action = args.collections_command
        if action == "list":
            rows = [c.as_dict() for c in store.collections()]
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            if not rows:
                print("no collections yet: crofter ingest PATH --collection NAME", file=sys.stderr)
                return 0
            from rich.console import Console
            from rich.table import Table

            table = Table(box=None, pad_edge=False)
            for col in ("NAME", "FILES", "FAILED", "CHUNKS", "EMBEDDER"):
                table.add_column(col)
            for r in rows:
                table.add_row(r["name"], str(r["files"]), str(r["failed"]), str(r["chunks"]), r["embedder"])
            Console(markup=False, highlight=False).print(table)
            return 0
        if action == "info":
            info = store.require(args.name)
            files = store.files(args.name)
            obj = {**info.as_dict(), "file_list": [
                {"path": f.path, "status": f.status, "reason": f.reason, "chunks": f.n_chunks} for f in files]}
            if args.json:
                print(json.dumps(obj, indent=2, ensure_ascii=False))
                return 0
            out = sys.stdout
            for k in ("name", "embedder", "dimension", "chunk_size", "chunk_overlap", "files", "failed", "chunks"):
                out.write(f"{k:14} {obj[k]}\n")
            for f in files:
                state = "ok" if f.status == "ok" else f"failed: {f.reason}"
                out.write(f"  {f.path}  ({f.n_chunks} chunks, {state})\n")
            return 0
        if action == "forget":
            return _forget(store, args)
        store.drop_collection(args.name)
        print(f"removed collection {args.name}", file=sys.stderr)
        return 0


def _forget(store, args) -> int:
    from rag.ingest import stored_under

    from ..render import display_safe

    store.require(args.name)
    found: dict[str, None] = {}
    nothing = []
    for path in args.paths:
        under = stored_under(store, args.name, path)
        if not under:
            nothing.append(path)
        found.update(dict.fromkeys(under))
    dropped = list(found)
    store.remove_files(args.name, dropped)
    if args.json:
        print(json.dumps({"collection": args.name, "removed": dropped, "not_found": nothing}, ensure_ascii=False))
    else:
        for p in dropped:
            print(f"  forgot: {display_safe(p)}", file=sys.stderr)
        for p in nothing:
            print(f"crofter: nothing in {args.name} is stored from {display_safe(p)}", file=sys.stderr)
        print(f"{args.name}: {len(dropped)} file(s) dropped", file=sys.stderr)
    return 1 if nothing else 0


def _rebuild(settings, names: list[str]) -> int:
    """Re-embed collections from the chunk texts in the catalogue (all of them when none is named)."""
    from rag import verify
    from rag.store import Store

    from .. import documents

    start = time.monotonic()
    with Store(documents.store_root(), chroma_url=settings.chroma_url or None, repair=True) as store:
        done = verify.repair(store, names, lambda embedder: documents.embedder(embedder, settings.embed_backend).encode)
        lost = store.lost_catalogue_wal
    for name, n in done:
        print(f"rebuilt {name}: {n} chunks re-embedded", file=sys.stderr)
    print(f"crofter: rebuilt {len(done)} collection(s) in {time.monotonic() - start:.1f} s", file=sys.stderr)
    if lost:
        print("crofter: the catalogue lost its last changes before the crash: run `crofter ingest` on your folders "
              "again to restore them", file=sys.stderr)
    return 0


def run_search(args) -> int:
    from .. import documents

    settings = _settings(args)
    if args.k < 1:
        raise CLIError("-k must be at least 1")
    with documents.open_store(settings) as store:
        retr = documents.retriever(store, settings, args.collection)
        hits = retr.search(args.collection, args.query, k=args.k, mode=args.mode)
    if retr.reranker is not None and retr.reranker.fallback:
        print(f"note: the reranker runs on torch ({retr.reranker.fallback})", file=sys.stderr)
    if args.json:
        print(json.dumps([h.as_dict() for h in hits], ensure_ascii=False))
        return 0
    if not hits:
        print("no matches", file=sys.stderr)
        return 0
    from ..render import display_safe

    for i, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())
        print(f"{i}. {display_safe(h.where())}  (score {h.score:.4f})")
        print(f"   {display_safe(snippet[:300])}{'...' if len(snippet) > 300 else ''}")
        for src in h.sources()[1:]:
            print(f"   also in {display_safe(src)}")
    return 0
