"""`crofter import nanogpt CKPT.pt --tokenizer DIR --out HF_DIR`: the user's own model, in."""
from __future__ import annotations

import json
from pathlib import Path


def run(args) -> int:
    from converter.nanogpt import import_nanogpt

    result = import_nanogpt(Path(args.checkpoint), Path(args.tokenizer), Path(args.out))
    name = None
    if not args.no_register:  # like `tune merge`: the folder is a model of the store, by name
        from models.registry import Registry, slug

        name = Registry().add(result.path, args.name or slug(result.path.name), source="imported").name
    if args.json:
        print(json.dumps({**result.as_dict(), "registered_as": name}, indent=2))
        return 0
    print(f"imported {args.checkpoint} -> {result.path}" + (f" (registered as {name})" if name else ""))
    print(f"  GPT-2: {result.n_layer} layers, n_embd {result.n_embd}, context {result.block_size}, "
          f"{result.n_params / 1e6:.1f}M parameters" + (f", iter {result.iter_num}" if result.iter_num is not None else ""))
    for note in result.notes:
        print(f"  {note}")
    print(f"next: crofter convert {name or result.path}   (or fine-tune it: crofter tune sft --base {name or result.path} --data ...)")
    return 0
