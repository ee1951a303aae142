"""`crofter ask`: one prompt, one streamed reply (or one JSON object with --json)."""
from __future__ import annotations

import json
import sys

from ..errors import CLIError


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
    if args.tools:
        return _run_with_tools(args, settings, session, entry, engine, prompt)
    grounded = None
    if args.collection:
        grounded = _grounded(args, settings, prompt)
        prompt = grounded.prompt
    for ev in session.send(prompt):
        if ev.text and not args.json:
            out.write(ev.text)
            out.flush()
    dropped = session.last_fit.describe_dropped()
    if dropped:
        print(f"crofter: {dropped}", file=sys.stderr)
    r = session.last_result
    extra = {}
    if grounded is not None:
        grounded.finish(r.text)
        extra["sources"] = [s.as_dict() for s in grounded.cited]
    if args.json:
        _print_json(entry, r.text, r.finish_reason, r, **extra)
    else:
        if not r.text.endswith("\n"):
            out.write("\n")
        if grounded is not None:
            _print_sources(grounded)
    engine.close()
    return 0


def _grounded(args, settings, question: str):
    """Retrieve passages and wrap the question with numbered sources (the store is released after)."""
    from .. import documents

    if args.k is not None and args.k < 1:
        raise CLIError("-k must be at least 1")
    if args.chroma_url:
        settings = settings.replace(chroma_url=args.chroma_url)
    with documents.open_store(settings) as store:
        return documents.ground(documents.collection_search(store, settings, args.collection), settings, question, args.k)


def _print_sources(grounded) -> None:
    from ..render import display_safe

    if not grounded.sources:
        print("crofter: no passage in the collection matched the question", file=sys.stderr)
        return
    if not grounded.cited:
        print("\n(The answer cites no source. Retrieved passages:)")
        listed = grounded.sources
    else:
        print("\nSources:")
        listed = grounded.cited
    for s in listed:
        print(f"  {display_safe(s.label())}")


def _print_json(entry, text: str, finish_reason: str, r, **extra) -> None:
    """The `ask --json` object (usage and timings are those of the last generation)."""
    obj = {
        "model": entry.name,
        "text": text,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens},
        "timings": {
            "prompt_tokens_evaluated": r.prompt_tokens_evaluated,
            "ttft_s": round(r.ttft_s, 4),
            "decode_tokens_per_s": round(r.decode_tokens_per_s, 2),
        },
        **extra,
    }
    print(json.dumps(obj, ensure_ascii=False))


def _approver(args):
    """Asks on the terminal (stderr + stdin) unless --yes; with no terminal, refuses."""

    def approve(tool, arguments, tainted: bool) -> bool:
        call = f"{tool.name}({json.dumps(arguments, ensure_ascii=False)})"
        if args.yes:
            return True
        if not sys.stdin.isatty():
            print(f"crofter: denied {call}: no terminal to ask (use --yes or --allow-tool {tool.name})", file=sys.stderr)
            return False
        print(f"crofter: run {call}? [y/N] ", end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().strip().lower() in ("y", "yes")

    return approve


def _run_with_tools(args, settings, session, entry, engine, prompt) -> int:
    search, store = None, None
    if args.collection:  # the model searches the collections itself through search_documents
        from .. import documents

        store = documents.open_store(settings.replace(chroma_url=args.chroma_url) if args.chroma_url else settings)
        search = documents.collection_search(store, settings, args.collection)
    try:
        return _tool_turn(args, settings, session, entry, engine, prompt, search)
    finally:
        if store is not None:
            store.close()


def _tool_turn(args, settings, session, entry, engine, prompt, search) -> int:
    from ..tools.calling import ToolLoop
    from ..tools.policy import Policy
    from ..tools.registry import ToolRegistry

    registry = ToolRegistry.for_settings(settings, search)
    for problem in registry.problems:
        print(f"crofter: warning: tool {problem}", file=sys.stderr)
    unknown = [n for n in args.allow_tool if n not in registry.tools]
    if unknown:
        raise CLIError(f"--allow-tool {unknown[0]}: no such tool (have: {', '.join(registry.tools)})")
    policy = Policy({name: "allow" for name in args.allow_tool})
    turn = ToolLoop(session, registry, policy, _approver(args)).run(prompt)
    if not args.json:
        for c in turn.calls:  # the transcript of calls goes to stderr, the answer to stdout
            print(f"crofter: tool {c.name}({json.dumps(c.arguments, ensure_ascii=False)}) -> {c.status}: {c.result[:200]}", file=sys.stderr)
        print(turn.answer)
    else:
        _print_json(entry, turn.answer, turn.finish_reason, session.last_result, tool_calls=turn.calls_json())
    engine.close()
    return 0
