"""`crofter eval`: perplexity, lm-eval tasks, prompt suites, retrieval suites and speed
for one or more models, side by side, every result kept; `crofter eval compare`
sets stored results side by side again later."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CLIError


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="evaluate and compare models: perplexity, benchmark tasks, prompt and retrieval suites, speed",
        description="Evaluate one or more models on the same items. MODEL is a store name, a GGUF file or an HF "
        "folder (with --adapter, a LoRA applied without merging). Results are kept in the data dir; "
        "`crofter eval compare A B ...` shows stored results side by side (deltas against the first model, "
        "* where a difference exceeds 2 standard errors).",
        epilog="Examples:  crofter eval base.gguf tuned.gguf --text notes/ --tasks my_mc --include-path tasks/   |   "
        "crofter eval smol --prompts suite.yaml --judge smol   |   crofter eval compare base tuned --plot cmp.png")
    ev.add_argument("models", nargs="*", metavar="MODEL", help="models to evaluate (or: compare NAME...)")
    ev.add_argument("--adapter", metavar="DIR|A.gguf", help="LoRA adapter applied to every MODEL (peft folder for HF, GGUF adapter for GGUF)")
    g = ev.add_argument_group("perplexity")
    g.add_argument("--text", metavar="FILE|DIR", help="held-out text (any format `crofter ingest` reads)")
    g.add_argument("--ctx", type=int, default=512, metavar="N", help="window in tokens; the second half of each is scored (default 512)")
    g.add_argument("--max-windows", type=int, metavar="N", help="score at most N windows")
    g.add_argument("--reference", metavar="MODEL", help="also mean KL divergence and same-top-token rate against this model")
    g = ev.add_argument_group("benchmark tasks (lm-evaluation-harness)")
    g.add_argument("--tasks", metavar="T1,T2", help="task names: local task YAML in --include-path, or lm-eval's registry when the data set is cached")
    g.add_argument("--include-path", action="append", default=[], metavar="DIR", help="folder of task YAML + data files (repeatable)")
    g.add_argument("--limit", type=int, metavar="N", help="at most N items per task")
    g.add_argument("--num-fewshot", type=int, metavar="K")
    g.add_argument("--task-ctx", type=int, default=2048, metavar="N", help="context for task requests (default 2048)")
    g = ev.add_argument_group("prompt suites")
    g.add_argument("--prompts", metavar="SUITE.yaml", help="prompts with checks, answered through the chat's own turn")
    g.add_argument("--judge", metavar="MODEL", help="model that answers the suite's judge checks (yes/no, by grammar)")
    g.add_argument("--allow-tool", action="append", default=[], metavar="NAME", help="tools suite prompts may run (repeatable)")
    g.add_argument("--yes", action="store_true", help="let suite prompts run every tool")
    g = ev.add_argument_group("retrieval suites")
    g.add_argument("--retrieval", metavar="QUESTIONS.json", help="questions with the expected source file: recall@k and MRR")
    g.add_argument("-c", "--collection", metavar="NAME", help="the collection --retrieval searches")
    g.add_argument("-k", type=int, default=5, metavar="N", help="retrieval depth (default 5)")
    g.add_argument("--chroma-url", metavar="URL", help="Chroma server (http://HOST:PORT)")
    g.add_argument("--reranker", metavar="NAME|DIR", help="cross-encoder that reorders the hits (a model store name or "
                   "a folder; none: off; default: the `reranker` setting); results are stored as "
                   "collection:NAME+RERANKER (a folder by its whole path), so `eval compare` sets them beside the "
                   "plain run")
    g = ev.add_argument_group("speed and size")
    g.add_argument("--speed", action="store_true", help="file size, peak memory, prompt and decode tokens/s (one child process per model)")
    g = ev.add_argument_group("output")
    g.add_argument("--json", action="store_true", help='print a list of {"model", "suite", "task", "metric", "value", "stderr", "n"}')
    g.add_argument("--plot", metavar="FILE.png", help="draw the comparison (png, svg or pdf)")
    g.add_argument("--no-store", action="store_true", help="do not keep the results")
    g.add_argument("--gpu-layers", type=int, default=0, metavar="N", help="layers offloaded to a GPU (default 0: CPU)")


@dataclass
class Target:
    label: str
    path: Path
    kind: str          # "gguf" or "hf"
    adapter: Path | None
    entry: object


def _targets(names: list[str], adapter: str | None) -> list[Target]:
    from models.registry import Registry

    reg = Registry()
    out = []
    for name in names:
        entry = reg.resolve(name)
        ad = None
        if adapter:
            if entry.kind == "hf":
                from models.adapters import resolve_adapter

                ad = resolve_adapter(adapter)
            else:
                ad = Path(adapter)
                if not ad.is_file():
                    raise CLIError(f"--adapter {adapter}: a GGUF model takes a GGUF adapter file (crofter convert-lora)")
                from models.gguf_check import check_adapter, check_gguf

                check_adapter(ad, check_gguf(entry.path))  # GGUFError: one line naming the file and field
        short = entry.name if entry.source != "path" else Path(name).name  # a store name, or the file's name
        label = short if ad is None else f"{short}+{ad.name}"
        out.append(Target(label, Path(entry.path), entry.kind, ad, entry))
    if len({(t.path, t.adapter) for t in out}) != len(out):
        raise CLIError("the same model is named twice")
    if len({t.label for t in out}) != len(out):  # two files of one name in different folders
        for t, name in zip(out, names):
            t.label = name if t.adapter is None else f"{name}+{t.adapter.name}"
    return out


def read_text(path: str) -> tuple[str, str]:
    """(text, name) of a file or of every readable file in a folder, through rag's loaders."""
    from .texts import read_documents

    return "\n\n".join(text for _, text in read_documents([path])), Path(path).expanduser().name


def run(args) -> int:
    if args.models[:1] == ["compare"]:
        return run_compare(args, args.models[1:])
    from finetune.evaluate.rows import EvalError

    if not (args.text or args.tasks or args.prompts or args.retrieval or args.speed):
        raise CLIError("nothing to evaluate: give --text, --tasks, --prompts, --retrieval or --speed")
    if not args.models and not args.retrieval:
        raise CLIError("name at least one MODEL")
    if args.reranker is not None and not args.retrieval:
        raise CLIError("--reranker goes with --retrieval (it reorders the retrieval suite's hits)")
    if args.retrieval and not args.collection:
        raise CLIError("--retrieval needs -c COLLECTION")
    if (args.tasks or args.include_path) and not args.tasks:
        raise CLIError("--include-path: name the tasks to run with --tasks")
    from .eval_run import Runner

    targets = _targets(args.models, args.adapter)
    runner = None
    try:
        runner = Runner(args)
        columns = [(t.label, runner.evaluate(t)) for t in targets]
        if args.retrieval:
            columns.append(runner.retrieval())
    except EvalError as e:
        raise CLIError(str(e)) from None
    finally:
        if runner is not None:
            runner.close()
    rows = [r for _, rs in columns for r in rs]
    if not args.no_store:
        runner.store(targets, columns)
    _show(args, columns, rows)
    return 0


def _show(args, columns, rows) -> None:
    from finetune.evaluate import compare

    table = compare.compare([c for c in columns if c[1]])
    if args.plot:
        compare.plot(table, Path(args.plot))
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], ensure_ascii=False))
        return
    from rich.console import Console

    Console(markup=False, highlight=False).print(compare.render(table))


def run_compare(args, names: list[str]) -> int:
    from finetune.evaluate import compare
    from finetune.evaluate.results import ResultStore
    from finetune.evaluate.rows import EvalError

    if not names:
        raise CLIError("eval compare: name the models to compare (store names, paths or hash prefixes)")
    try:
        table = compare.from_store(ResultStore(), names)
        if args.plot:
            compare.plot(table, Path(args.plot))
    except EvalError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(compare.table_json(table), ensure_ascii=False))
    else:
        from rich.console import Console

        Console(markup=False, highlight=False).print(compare.render(table))
    return 0


def progress_bar(args, label: str):
    """A bar with items/s and ETA on a terminal; None with --json or without a terminal."""
    if args.json or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[what]}", markup=False),
                    console=Console(stderr=True, markup=False, highlight=False), transient=True)
