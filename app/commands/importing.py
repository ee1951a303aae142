"""`crofter import nanogpt CKPT.pt --tokenizer DIR --out HF_DIR`: the user's own model, in."""
from __future__ import annotations

import json
from pathlib import Path


def run(args) -> int:
    from converter.nanogpt import import_nanogpt

    result = import_nanogpt(Path(args.checkpoint), Path(args.tokenizer), Path(args.out))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(f"imported {args.checkpoint} -> {result.path}")
    print(f"  GPT-2: {result.n_layer} layers, n_embd {result.n_embd}, context {result.block_size}, "
          f"{result.n_params / 1e6:.1f}M parameters" + (f", iter {result.iter_num}" if result.iter_num is not None else ""))
    for note in result.notes:
        print(f"  {note}")
    print(f"next: crofter convert {result.path}   (or fine-tune it: crofter tune sft --base {result.path} --data ...)")
    return 0
