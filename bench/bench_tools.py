"""Tool calling with the bundled model: the ToolLoop's variants side by side, on two splits.

bench/data/tools_tune.json holds the prompts variants are chosen on; tools_heldout.json was
written separately (other wording, other files in the folder) and is only ever reported,
never tuned on. Both include prompts that need no tool. Each prompt runs one whole turn
(greedy, max_calls 2) in a fresh session, and is scored:

    valid      the first step was a call of a real tool whose arguments pass its schema
    right      ... of the tool the prompt needs                    (prompts that need a tool)
    correct    the right tool ran ok and the answer holds the expected text
    needless   a tool was called at all                            (prompts that need none)
    states     the answer states the result of a tool whose result is the answer (calculator, clock)

    python bench/bench_tools.py [--split tune|heldout|both] [--variant NAME ...] [--json]
    python bench/bench_tools.py --list          # the variants and their ToolLoop options
"""
from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import jsonschema

from app.engine import Engine, LoadOptions, Sampling
from app.session import ChatSession
from app.tools.calling import ToolLoop
from app.tools.policy import Policy
from app.tools.registry import ToolContext, ToolRegistry
from app.tools.step import states
from models.bundled import bundled_gguf
from models.registry import ModelEntry

DATA = Path(__file__).parent / "data"
SPLITS = {"tune": DATA / "tools_tune.json", "heldout": DATA / "tools_heldout.json"}

# What crofter shipped before issue #16: grammar-sampled choice, one fixed calculator example,
# free-string paths, answers in the model's own words.
OLD = dict(choose="sample", examples="fixed", listing=False, state_result=False, after="never", copy=False)
VARIANTS: dict[str, dict] = {
    "old": OLD,
    "unconstrained": dict(OLD, constrained=False),  # the instructions alone: what the grammar buys
    "default": {},  # ToolLoop's defaults: the winners below
    "sample": dict(choose="sample"),
    "rank": dict(choose="rank"),
    "channel": dict(choose="channel"),
    "decide": dict(choose="decide"),
    "no-examples": dict(examples="none"),
    "fixed-example": dict(examples="fixed"),
    "no-listing": dict(listing=False),
    "no-state": dict(state_result=False, after="never"),
    "state-more": dict(state_result="more"),  # the stated result, then the model's own words
    "state-only": dict(after="never"),  # the answer begins with the result only once the call cap is hit
    "after-ok": dict(after="ok"),
    "penalty": dict(copy=False),  # the chat's repeat penalty (1.1) in tool steps too
}
DEFAULT_VARIANTS = ["old", "default"]


def load_split(name: str) -> dict:
    data = json.loads(SPLITS[name].read_text())
    today = datetime.datetime.now().astimezone().date()
    for c in data["cases"]:
        if c["expect"]:
            c["expect"] = c["expect"].format(date=today.isoformat(), year=today.year)
    return data


def score(engine, reg, cases, options: dict, max_tokens: int, verbose: bool = False) -> dict:
    n_tool = valid = right = correct = n_none = needless = n_answers = stated = contradicts = 0
    rows = []
    t0 = time.perf_counter()
    for c in cases:
        session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=max_tokens))
        loop = ToolLoop(session, reg, Policy(), approve=lambda t, a, tainted: True, max_calls=2, **options)
        turn = loop.run(c["prompt"])
        first = turn.calls[0] if turn.calls else None
        ok_first = first is not None and first.name in reg.tools
        if ok_first:
            try:
                jsonschema.validate(first.arguments, reg.tools[first.name].parameters)
            except jsonschema.ValidationError:
                ok_first = False
        if c["tool"] is None:
            n_none += 1
            needless += bool(turn.calls)
        else:
            n_tool += 1
            valid += ok_first
            right += ok_first and first.name == c["tool"]
            ran = any(x.name == c["tool"] and x.status == "ok" for x in turn.calls)
            correct += ran and (c["expect"] is None or c["expect"].lower() in turn.answer.lower())
        last = next((x for x in reversed(turn.calls) if x.status == "ok"), None)
        if last is not None and reg.tools[last.name].answers_call(last.arguments, c["prompt"]):
            n_answers += 1
            stated += states(turn.answer, last.result)
            contradicts += turn.contradicts_result
        if verbose:
            print(f"  {time.perf_counter() - t0:7.1f}s {c['prompt'][:40]!r} -> {[(x.name, x.status) for x in turn.calls]} "
                  f"{turn.answer[:60]!r}", flush=True)
        rows.append({"prompt": c["prompt"], "want": c["tool"], "calls": [(x.name, x.arguments, x.status) for x in turn.calls],
                     "answer": turn.answer, "choice": turn.choice[:2]})
    rate = lambda k, n: round(k / n, 3) if n else None  # noqa: E731
    return {"valid": rate(valid, n_tool), "right_tool": rate(right, n_tool), "correct": rate(correct, n_tool),
            "needless": rate(needless, n_none), "states_result": rate(stated, n_answers),
            "contradicts": rate(contradicts, n_answers), "n_tool": n_tool, "n_none": n_none,
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["tune", "heldout", "both"], default="both")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help=f"repeatable; default {DEFAULT_VARIANTS}")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: every CPU; 1 on a shared machine)")
    ap.add_argument("--json", action="store_true", help="print the figures (and each prompt's turn) as JSON")
    ap.add_argument("--verbose", action="store_true", help="print each prompt's calls and answer as it finishes")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--out", help="also write the figures and each prompt's turn to this JSON file")
    args = ap.parse_args()
    if args.list:
        for name, opts in VARIANTS.items():
            print(f"{name:14} {opts or '(ToolLoop defaults)'}")
        return
    variants = args.variant or DEFAULT_VARIANTS
    splits = ["tune", "heldout"] if args.split == "both" else [args.split]
    engine = Engine.load(ModelEntry("bench", str(bundled_gguf()), "gguf"), LoadOptions(n_ctx=2048, threads=args.threads))
    results = []
    for split in splits:
        data = load_split(split)
        root = Path(tempfile.mkdtemp(prefix=f"crofter-bench-{split}-"))
        for name, text in data["files"].items():
            (root / name).write_text(text)
        reg = ToolRegistry.discover(ToolContext(roots=[str(root)]))
        for v in variants:
            r = score(engine, reg, data["cases"], VARIANTS[v], args.max_tokens, args.verbose)
            results.append({"variant": v, "split": split, **r})
            if not args.json:
                print(f"{v:14} {split:8} " + "  ".join(f"{k} {r[k]}" for k in
                      ("valid", "right_tool", "correct", "needless", "states_result", "contradicts", "seconds")), flush=True)
    engine.close()
    if args.json:
        print(json.dumps(results, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return
    print(f"\n{'variant':14} {'split':8} {'valid':>6} {'right':>6} {'correct':>8} {'needless':>9} {'states':>7}")
    for r in results:
        print(f"{r['variant']:14} {r['split']:8} {r['valid']:>6} {r['right_tool']:>6} {r['correct']:>8} {r['needless']:>9} "
              f"{str(r['states_result']):>7}")
    for r in results:  # each variant against the first one named, on the same split
        base = next(b for b in results if b["split"] == r["split"])
        if r is not base and base["correct"]:
            print(f"{r['variant']} / {base['variant']} ({r['split']}): correct x{r['correct'] / base['correct']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
