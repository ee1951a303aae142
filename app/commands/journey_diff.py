"""`crofter journey diff A B --prompts FILE`: what a training stage changed inside the model.

The parser is argparse only; torch, transformers and peft load inside `run_diff` (finetune/diff.py).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..errors import CLIError

DIFFS = "diffs"  # the data-dir folder a diff goes to without --out


def add_diff_parser(jsub) -> None:
    """Add the `diff` action to the `crofter journey` subparsers."""
    p = jsub.add_parser(
        "diff", help="what a stage changed inside the model: KL per token, per-layer drift, logit lens, LoRA norms",
        description="Compare two models on the same prompts: the KL between their next-token distributions at "
        "every position (and the tokens that moved most), the residual-stream cosine distance after each "
        "decoder layer, a logit lens of one prompt for each, and, where an adapter is involved, the norm of "
        "each LoRA module's weight change. Writes diff.png and diff.json to --out. A and B must share the "
        "tokenizer. Each is an HF checkpoint folder, BASE+ADAPTER_DIR, or a journey stage folder "
        "(RUN/01-sft: the run's adapter on its base; RUN/03-merge: the merged model).",
        epilog="Examples:  crofter journey diff ~/smollm2-hf RUN/01-sft --prompts prompts.txt --chat   |   "
        "crofter journey diff sft dpo --run persona.yaml --prompts prompts.txt")
    p.add_argument("a", metavar="A", help="the model before (HF_DIR, BASE+ADAPTER_DIR, a stage folder, or with --run a stage name)")
    p.add_argument("b", metavar="B", help="the model after (same forms)")
    p.add_argument("--run", metavar="RUN|JOURNEY.yaml",
                   help="name A and B by stage (base, sft, dpo, 01-sft, ...) in this journey run folder (or the "
                   "journey file's default run folder); the diff goes to RUN/diffs/A-vs-B")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help='prompts, one a line (or JSONL with {"prompt": ...})')
    p.add_argument("--out", metavar="DIR", help=f"where diff.png and diff.json go (default: <data dir>/{DIFFS}/A-vs-B)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON instead of the summary")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens per prompt (default: 64)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn with the generation prompt (keeps its last N tokens)")
    p.add_argument("--lens-prompt", type=int, default=0, metavar="I", help="the prompt (0-based) of the logit lens")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present, else cpu")


def _slug(spec: str) -> str:
    parts = [p for p in re.split(r"[+/\\]", spec) if p and p not in (".", "..")]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts[-2:]))[:60] or "model"


def default_out(a: str, b: str) -> Path:
    from models.paths import data_dir

    return data_dir() / DIFFS / f"{_slug(a)}-vs-{_slug(b)}"


GGUF_STAGES = ("convert", "quantize")


def stage_spec(name: str, run: str) -> tuple[str, Path]:
    """(the side to load, the run folder) for a stage `name` of the journey run `run` (a run folder
    or a journey file): "base" is the journey's base, "sft" or "01-sft" that stage's folder."""
    from finetune.diff_inputs import DiffError

    from ..journey.plan import JourneyError, load_journey
    from ..journey.runner import STATE, load_state, run_dir_for

    target = Path(run).expanduser()
    if not target.exists():
        raise DiffError(f"--run {run}: no such journey file or run folder")
    # A journey file's run is its default folder, read with the --set values it ran with (a file
    # whose base came from --set has none of its own).
    run_dir = target if target.is_dir() else run_dir_for(target)
    try:
        state = load_state(run_dir)
        if not state.get("journey"):
            raise DiffError(f"--run {run}: " + (f"not a journey run folder (no {STATE})" if target.is_dir()
                                                 else f"has not run in its default folder {run_dir} (if it ran with --out DIR, give --run DIR)"))
        journey = load_journey(state["journey"] if target.is_dir() else target, state.get("sets", []))
    except JourneyError as exc:
        raise DiffError(f"--run {run}: {exc}") from None
    stages = [(st.folder_name, st.kind) for st in journey.stages]
    if name == "base" or name == "00-base":
        if journey.base_path is None:  # an import stage makes the base
            name = stages[0][0]
        else:
            return str(journey.base_path), run_dir
    hit = next(((folder, kind) for folder, kind in stages if name in (folder, kind)), None)
    if hit is None:
        raise DiffError(f"--run {run}: no stage {name!r} (stages: base, {', '.join(k for _f, k in stages)})")
    folder, kind = hit
    if kind in GGUF_STAGES:
        raise DiffError(f"stage {folder}: a GGUF; diff compares the HF models (name the merge stage instead)")
    if state.get("stages", {}).get(folder, {}).get("status") != "done":
        raise DiffError(f"stage {folder}: has not finished in {run_dir} (crofter journey run first)")
    return str(run_dir / folder), run_dir


def run_diff(args) -> int:
    from finetune.diff_inputs import DiffError, load_prompts, resolve_side
    from models.registry import ModelError

    try:
        if args.run:
            (sa, run_dir), (sb, _r) = stage_spec(args.a, args.run), stage_spec(args.b, args.run)
            if not args.out:
                args.out = str(run_dir / DIFFS / f"{_slug(args.a)}-vs-{_slug(args.b)}")
            args.a, args.b = sa, sb
        a, b = resolve_side(args.a), resolve_side(args.b)
        prompts = load_prompts(args.prompts)
        if args.max_tokens < 1:
            raise DiffError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
        if not 0 <= args.lens_prompt < len(prompts):
            raise DiffError(f"--lens-prompt {args.lens_prompt}: {args.prompts} has {len(prompts)} prompts "
                            f"(0 to {len(prompts) - 1})")
        out = Path(args.out).expanduser() if args.out else default_out(args.a, args.b)
        if out.exists() and not out.is_dir():
            raise DiffError(f"{out}: exists and is not a folder (--out)")
        from finetune.diff import diff, summary
        from finetune.diff_plot import write_png
        from models.atomic import write_text

        result = diff(a, b, prompts, max_tokens=args.max_tokens, chat=args.chat, lens_prompt=args.lens_prompt,
                      device=args.device)
        result["png"], result["json"] = str(out / "diff.png"), str(out / "diff.json")
        text = json.dumps(result, indent=2, ensure_ascii=False)
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_png(result, out / "diff.png")
            write_text(out / "diff.json", text)
        except OSError as exc:
            raise DiffError(f"{out}: writing the diff failed ({exc.strerror or exc}); nothing was left half-written") from None
    except (DiffError, ModelError) as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(text)
    else:
        print(summary(result))
        print(f"crofter: wrote {out / 'diff.json'}", file=sys.stderr)
    return 0
