"""`crofter ask`: one prompt, one streamed reply (or one JSON object with --json)."""
from __future__ import annotations

import json
import sys

from ..cli import CLIError


def settings_from_args(args):
    """Config file values with the command-line flags applied on top."""
    from .. import config

    return config.load().replace(
        model=args.model,
        n_ctx=args.n_ctx,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    settings = settings_from_args(args)
    from models.registry import Registry

    from ..chat import default_loader
    from ..engine import Sampling
    from ..session import ChatSession

    entry = Registry().resolve(settings.model)
    engine = default_loader(entry, settings)

    system = settings.system_prompt if args.system is None else args.system
    session = ChatSession(engine, Sampling.from_settings(settings, args.stop), system=system)
    if engine.template.warning:
        print(f"crofter: warning: {engine.template.warning}", file=sys.stderr)
    out = sys.stdout
    for ev in session.send(prompt):
        if ev.text and not args.json:
            out.write(ev.text)
            out.flush()
    dropped = session.last_fit.describe_dropped()
    if dropped:
        print(f"crofter: {dropped}", file=sys.stderr)
    r = session.last_result
    if args.json:
        json.dump(
            {
                "model": entry.name,
                "text": r.text,
                "finish_reason": r.finish_reason,
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens},
                "timings": {
                    "prompt_tokens_evaluated": r.prompt_tokens_evaluated,
                    "ttft_s": round(r.ttft_s, 4),
                    "decode_tokens_per_s": round(r.decode_tokens_per_s, 2),
                },
            },
            out,
            ensure_ascii=False,
        )
        out.write("\n")
    elif not r.text.endswith("\n"):
        out.write("\n")
    engine.close()
    return 0
