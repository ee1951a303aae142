"""`crofter ask`: one prompt, one streamed reply (or one JSON object with --json).

The turn is the chat app's own (turn.run_turn): grounded on collections with -c, through
the tool loop with --tools; this file only prints its events."""
from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path

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
        **({"chroma_url": args.chroma_url} if getattr(args, "chroma_url", None) else {}),
    )


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    if args.k is not None and args.k < 1:
        raise CLIError("-k must be at least 1")
    settings = settings_from_args(args)
    from models.registry import Registry

    from ..chat import default_loader
    from ..engine import Sampling
    from ..session import ChatSession

    if args.grammar_file and args.tools:
        raise CLIError("--grammar-file and --tools cannot be combined: tool calls have their own grammar")
    entry = Registry().resolve(settings.model)
    _grammar(args.grammar_file)  # a bad grammar fails before the model loads
    with ExitStack() as stack:
        search = _search(args, settings, stack)
        uses = _uses(args, settings, search)
        engine = default_loader(entry, settings, Path(args.lora).expanduser() if args.lora else None)
        stack.callback(engine.close)
        if engine.template.warning:
            print(f"crofter: warning: {engine.template.warning}", file=sys.stderr)
        system = settings.system_prompt if args.system is None else args.system
        sampling = Sampling.from_settings(settings, args.stop)
        sampling.grammar = _grammar(args.grammar_file)
        session = ChatSession(engine, sampling, system=system)
        done = _print_turn(args, session.send(prompt, **uses))
        _finish(args, entry, done)
    return 0


def _grammar(path: str | None):
    """The --grammar-file as a LlamaGrammar (None without one)."""
    if not path:
        return None
    from pathlib import Path

    from llama_cpp import LlamaGrammar

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"--grammar-file {path}: cannot read it ({exc})") from None
    try:
        return LlamaGrammar.from_string(text, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(f"--grammar-file {path}: not a valid GBNF grammar ({exc})") from None


def _search(args, settings, stack):
    """search(query, k) over the -c collections (the store stays open for the turn), or None."""
    if not args.collection:
        return None
    from .. import documents

    store = stack.enter_context(documents.open_store(settings))
    return documents.collection_search(store, settings, args.collection)


def _uses(args, settings, search) -> dict:
    """What the turn may use: tools (the model searches the collections itself through
    search_documents), else passages retrieved for the question."""
    if args.tools:
        from ..tools.policy import Policy
        from ..tools.registry import ToolRegistry
        from ..turn import TurnTools

        registry = ToolRegistry.for_settings(settings, search)
        for problem in registry.problems:
            print(f"crofter: warning: tool {problem}", file=sys.stderr)
        unknown = [n for n in args.allow_tool if n not in registry.tools]
        if unknown:
            raise CLIError(f"--allow-tool {unknown[0]}: no such tool (have: {', '.join(registry.tools)})")
        return {"tools": TurnTools(registry, Policy({name: "allow" for name in args.allow_tool}), _approver(args))}
    if search is not None:
        from .. import documents

        return {"ground": documents.grounder(search, args.k or settings.rag_top_k)}
    return {}


def _print_turn(args, events):
    """Stream the answer to stdout (the trace and tool calls to stderr); return the Done."""
    from ..turn import Done, TextDelta, ThinkingDelta, ToolFinished

    from ..render import display_safe

    out, done, thinking = sys.stdout, None, False
    # On a terminal, control characters (an escape sequence in a file the answer quotes) are shown,
    # not obeyed; a pipe gets the text as it is.
    shown = display_safe if out.isatty() else (lambda text: text)
    for ev in events:
        if isinstance(ev, Done):
            done = ev
        elif args.json:
            continue
        elif isinstance(ev, ThinkingDelta) and args.show_thinking:
            if not thinking:
                print("crofter: thinking:", file=sys.stderr)
                thinking = True
            sys.stderr.write(display_safe(ev.text))
            sys.stderr.flush()
        elif isinstance(ev, TextDelta):
            if thinking:
                print(file=sys.stderr)
                thinking = False
            out.write(shown(ev.text))
            out.flush()
        elif isinstance(ev, ToolFinished):
            c = ev.call
            print(display_safe(f"crofter: tool {c.name}({json.dumps(c.arguments, ensure_ascii=False)}) -> {c.status}: "
                               f"{c.result[:200]}"), file=sys.stderr)
    return done


def _finish(args, entry, done) -> None:
    from ..render import display_safe

    dropped = done.fit.describe_dropped()
    if dropped:
        print(f"crofter: {dropped}", file=sys.stderr)
    if done.contradicts_result:
        last = [c for c in done.calls if c.status == "ok"][-1]
        print(display_safe(f"crofter: warning: the answer does not state the result of {last.name} ({last.result[:80]})"),
              file=sys.stderr)
    if done.finish_reason == "error":  # a remote model's stream broke mid-reply
        print(f"crofter: the reply is incomplete: {entry.name}'s server stopped sending", file=sys.stderr)
    if args.json:
        _print_json(entry, done, tools=bool(args.tools))
        return
    if not done.answer.endswith("\n"):
        sys.stdout.write("\n")
    if done.grounded:
        _print_sources(done)


def _print_sources(done) -> None:
    from ..render import display_safe

    if not done.sources:
        print("crofter: no passage in the collection matched the question", file=sys.stderr)
        return
    if not done.cited:
        print("\n(The answer cites no source. Retrieved passages:)")
        listed = done.sources
    else:
        print("\nSources:")
        listed = done.cited
    for s in listed:
        print(f"  {display_safe(s.label())}")


def _print_json(entry, done, tools: bool) -> None:
    """The `ask --json` object (usage and timings are those of the last generation)."""
    from dataclasses import asdict

    r = done.result
    obj = {
        "model": entry.name,
        "text": done.answer,
        "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens},
        "timings": {
            "prompt_tokens_evaluated": r.prompt_tokens_evaluated,
            "ttft_s": round(r.ttft_s, 4),
            "decode_tokens_per_s": round(r.decode_tokens_per_s, 2),
        },
    }
    if done.thinking:
        obj["thinking"] = done.thinking
    if done.grounded:
        obj["sources"] = [s.as_dict() for s in done.cited]
    if tools:
        obj["tool_calls"] = [asdict(c) for c in done.calls]
        obj["contradicts_result"] = done.contradicts_result
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
