"""`crofter models list|info|add|add-remote|rm|default|pull|dequantize`."""
from __future__ import annotations

import json

from models.registry import Registry


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"  # pragma: no cover


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _describe(entry) -> dict:
    """`models.info.describe`, or for a remote model what was registered (no network)."""
    if entry.kind == "remote":
        return {"name": entry.name, "path": entry.path, "kind": "remote", "source": "remote", "base_url": entry.path,
                "model": entry.model or "(the server's only model)", "api_key_env": entry.api_key_env or None,
                "context_length": entry.n_ctx or None}
    from models.info import describe

    return describe(entry)


def add_remote(args, reg) -> int:
    """Register a server's model; unless --no-check, the server must answer GET /models first
    (one that does not leaves the registry as it was)."""
    entry = reg.remote_entry(args.name, args.base_url, args.model or "", args.api_key_env or "", args.n_ctx or 0)
    model, served = entry.model, 0
    if not args.no_check:
        from ..remote import api_key, check_server

        model, served = check_server(entry.path, api_key(entry), entry.model, entry.api_key_env)
    entry = reg.add_remote(entry.name, entry.path, model, entry.api_key_env, entry.n_ctx or served)
    ctx = f", n_ctx {entry.n_ctx}" if entry.n_ctx else ""
    print(f"added {entry.name} (remote): {entry.model or 'the server model'} at {entry.path}{ctx}")
    return 0


def run(args) -> int:
    from .. import config

    reg = Registry()
    action = args.models_command
    if action == "list":
        default = config.load().model
        rows = [{**_describe(e), "default": e.name == default} for e in reg.entries()]
        if args.json:
            _print_json(rows)
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for col in ("", "NAME", "KIND", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "SOURCE"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                "*" if r["default"] else "",
                r["name"],
                r["kind"],
                r["model"] if r["kind"] == "remote" else r.get("architecture", r.get("error", "?")),
                r.get("parameters_human", "-"),
                r.get("quantization") or r.get("dtype") or "-",
                str(r.get("context_length") or "-"),
                _size(r.get("size_bytes")),
                r["base_url"] if r["kind"] == "remote" else r["source"],
                style="red" if "error" in r else None,
            )
        # Names and paths are shown literally, never read as markup.
        Console(markup=False, highlight=False).print(table)
        return 0
    if action == "info":
        facts = _describe(reg.resolve(args.name))
        if args.json:
            _print_json(facts)
        else:
            width = max(map(len, facts))
            for k, v in facts.items():
                print(f"{k:<{width}}  {_size(v) if k == 'size_bytes' else v}")
        return 1 if "error" in facts else 0
    if action == "add":
        e = reg.add(args.path, name=args.name)
        print(f"added {e.name} ({e.kind}): {e.path}")
        return 0
    if action == "add-remote":
        return add_remote(args, reg)
    if action == "rm":
        e = reg.remove(args.name)
        print(f"removed {e.name}")
        if config.load().model == e.name:
            config.set_value("model", config.Settings().model)
            print(f"default model is now {config.Settings().model}")
        return 0
    if action == "default":
        e = reg.get(args.name)
        config.set_value("model", e.name)
        print(f"default model: {e.name}")
        return 0
    if action == "pull":
        from models.hub import pull

        e = pull(args.spec, revision=args.revision, name=args.name, registry=reg)
        if args.json:
            _print_json({"name": e.name, "path": e.path, "kind": e.kind, "source": e.source})
        else:
            print(f"pulled {e.name} ({e.kind}): {e.path}")
        return 0
    if action == "dequantize":
        return dequantize(args, reg)
    raise AssertionError(action)  # argparse only allows the actions above


def dequantize(args, reg) -> int:
    """A GGUF model -> an HF safetensors folder (float32, tokenizer and chat template kept) that
    `crofter tune` and journeys train; the folder appears only when complete."""
    from pathlib import Path

    from models.atomic import atomic_dir
    from models.registry import slug

    from ..errors import CLIError

    src = reg.resolve_kind(args.name, "gguf", "dequantize reads a GGUF file")
    out = Path(args.out).expanduser()
    if out.exists():
        raise CLIError(f"--out {out}: exists; choose a new folder")
    from converter.hf import gguf_to_checkpoint

    try:
        with atomic_dir(out) as tmp:
            gguf_to_checkpoint(src, tmp)
    except (ValueError, OSError) as exc:  # transformers refuses GGUF architectures it cannot read
        raise CLIError(f"{src}: cannot dequantize it ({str(exc).splitlines()[0]}); nothing was written") from None
    name = None if args.no_register else reg.add(out, args.as_name or slug(out.name), source="dequantized").name
    if args.json:
        _print_json({"path": str(out), "registered_as": name})
    else:
        print(f"wrote {out}" + (f" (registered as {name})" if name else ""))
    return 0
