"""`crofter chats list|show|search|export|rm`: the saved chat history."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from models import atomic

from .. import chat_export
from ..errors import CLIError
from ..history import HistoryStore


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def run(args) -> int:
    store = HistoryStore()
    action = args.chats_command
    if action == "list":
        chats = store.chats()
        if args.json:
            print(json.dumps([dataclasses.asdict(c) for c in chats], indent=2, ensure_ascii=False))
        for c in [] if args.json else chats:
            print(f"{c.id:>5}  {_when(c.updated)}  {c.model or '-':<20}  {c.title}")
        return 0
    if action == "show":
        if args.json:
            print(json.dumps(chat_export.as_json(store, args.id), indent=2, ensure_ascii=False))
        else:
            print(chat_export.as_markdown(store, args.id))
        return 0
    if action == "search":
        hits = store.search(args.query, limit=args.limit)
        if args.json:
            print(json.dumps([dataclasses.asdict(h) for h in hits], indent=2, ensure_ascii=False))
        for h in [] if args.json else hits:
            print(f"chat {h.chat_id:>4} ({h.chat_title}) {h.role}: {h.snippet}")
        return 0 if hits or args.json else 1
    if action == "export":
        if args.prefs or args.marks:
            return _export_preferences(store, args)
        if args.id is None:
            raise CLIError("chats export: give a chat ID (see `crofter chats list`), or --prefs/--marks FILE")
        if args.format == "json":
            text = json.dumps(chat_export.as_json(store, args.id), indent=2, ensure_ascii=False) + "\n"
        else:
            text = chat_export.as_markdown(store, args.id)
        if args.output:
            atomic.write_text(Path(args.output), text)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    if action == "rm":
        for chat_id in args.ids:
            store.delete_chat(chat_id)
            print(f"deleted chat {chat_id}")
        return 0
    raise AssertionError(action)


def _export_preferences(store: HistoryStore, args) -> int:
    """--prefs / --marks: JSONL files, each written whole or not at all."""
    def write(path: str, records: list[dict], what: str) -> None:
        if not records:
            raise CLIError(f"no {what} in {'chat ' + ', '.join(map(str, args.chat)) if args.chat else 'any chat'}: "
                           "mark a reply preferred after a regenerate (or thumbs up/down) in the chat app first")
        atomic.write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"wrote {len(records)} {what} to {path}", file=sys.stderr)

    if args.prefs:
        write(args.prefs, chat_export.training_pairs(store, args.chat or None, args.with_compare), "preference pairs")
    if args.marks:
        write(args.marks, chat_export.marks(store, args.chat or None), "marked replies")
    return 0
