"""`crofter convert`, `crofter quantize`, `crofter convert-lora` and `crofter verify`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cli import CLIError

# A public text present on Debian-family systems, used for the quantization report
# when no --eval-text is given.
DEFAULT_EVAL_TEXTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GPL-2")


def _quiet(args) -> None:
    """llama.cpp logs every tensor it touches; keep them for --debug."""
    if not args.debug:
        from llama_cpp import _logger

        _logger.set_verbose(False)


def _console():
    from rich.console import Console

    return Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


def _progress(args, label: str):
    """A rich progress bar on a terminal, nothing otherwise (or with --json)."""
    if args.json or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[what]}", markup=False), console=_console(), transient=True)


def _resolve_hf(name: str) -> Path:
    from models.registry import Registry

    return Registry().resolve_kind(name, "hf", "conversion needs an HF checkpoint folder")


def _resolve_gguf(name: str) -> Path:
    from models.registry import Registry

    return Registry().resolve_kind(name, "gguf", "this needs a GGUF file")


def _register(path: Path, name: str | None, args) -> str | None:
    if args.no_register:
        return None
    from models.registry import Registry, slug

    entry = Registry().add(path, name or slug(path.stem), source="converted")
    return entry.name


def run_convert(args) -> int:
    _quiet(args)
    from converter.convert import convert
    from models import paths

    hf = _resolve_hf(args.hf_dir)
    out = Path(args.out) if args.out else paths.models_dir() / f"{hf.name}-{args.outtype.upper()}.gguf"
    bar = _progress(args, "convert")
    if bar:
        with bar:
            task = bar.add_task("convert", total=None, what="")
            result = convert(hf, out, args.outtype,
                             on_tensor=lambda i, n, name: bar.update(task, completed=i, total=n, what=name))
    else:
        result = convert(hf, out, args.outtype)
    report = {"path": str(result.path), "outtype": result.outtype, "tensors": result.tensors,
              "pre_tokenizer": result.pre_tokenizer, "seconds": round(result.seconds, 2)}
    if not args.no_verify:
        report["verify"] = _verify_converted(hf, result.path, args.outtype)
    report["registered_as"] = _register(result.path, args.name, args)
    _report(args, report)
    return 0 if report.get("verify", {}).get("ok", True) else 1


def _verify_converted(hf: Path, path: Path, outtype: str) -> dict:
    from converter import verify

    out = {"tokenizer": verify.tokenizer_parity(hf, path)}
    if outtype in ("f32", "f16", "bf16"):
        out["logits"] = verify.logits_parity(hf, path)
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def run_quantize(args) -> int:
    _quiet(args)
    from converter.quantize import SOURCE_KEY, quantize

    inp = _resolve_gguf(args.input)
    out = Path(args.output) if args.output else inp.with_name(
        inp.name.replace("-F16", "").replace("-F32", "").replace("-BF16", "").removesuffix(".gguf") + f"-{args.type}.gguf")
    imatrix = None
    if args.calibration:
        from converter.imatrix import compute_imatrix
        from models.gguf_check import check_gguf

        hf = args.hf or check_gguf(inp).metadata.get(SOURCE_KEY)
        if not hf or not Path(hf).is_dir():
            raise CLIError(f"--calibration needs the HF checkpoint {inp.name} came from: pass --hf DIR")
        bar = _progress(args, "calibrate")
        if bar:
            with bar:
                task = bar.add_task("calibrate", total=None, what="chunks of 512 tokens")
                imatrix = compute_imatrix(hf, args.calibration,
                                          on_progress=lambda i, n: bar.update(task, completed=i, total=n))
        else:
            imatrix = compute_imatrix(hf, args.calibration)
    bar = _progress(args, f"quantize {args.type}")
    if bar:
        with bar:
            task = bar.add_task("q", total=None, what="MB written (estimate)")
            result = quantize(inp, out, args.type, imatrix=imatrix, threads=args.threads or 0, quiet=not args.debug,
                              on_progress=lambda done, est: bar.update(task, completed=done >> 20,
                                                                       total=max(est, done) >> 20))
    else:
        result = quantize(inp, out, args.type, imatrix=imatrix, threads=args.threads or 0, quiet=not args.debug)
    report = {"path": str(result.path), "type": result.qtype, "size_bytes": result.size_bytes,
              "seconds": round(result.seconds, 2), "imatrix_tensors": result.imatrix_tensors}
    if not args.no_verify:
        report["verify"] = _quant_report(inp, result.path, args.eval_text)
    report["registered_as"] = _register(result.path, args.name, args)
    _report(args, report)
    return 0


def _quant_report(base: Path, quant: Path, eval_text: str | None) -> dict:
    from converter.verify import quant_report

    path = eval_text or next((p for p in DEFAULT_EVAL_TEXTS if Path(p).is_file()), None)
    if path is None:
        return {"skipped": "no evaluation text: pass --eval-text FILE"}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CLIError(f"--eval-text {path}: {exc.strerror or exc}") from None
    try:
        return {"text": path, **quant_report(base, quant, text, max_tokens=2048)}
    except ValueError as exc:
        return {"text": path, "skipped": str(exc)}


def run_convert_lora(args) -> int:
    _quiet(args)
    from converter.lora import convert_lora

    r = convert_lora(args.adapter_dir, _resolve_hf(args.base), args.out)
    _report(args, {"path": str(r.path), "tensors": r.tensors, "rank": r.rank, "alpha": r.alpha_written})
    return 0


def run_verify(args) -> int:
    _quiet(args)
    from converter import verify
    from converter.quantize import SOURCE_KEY
    from models.gguf_check import check_gguf

    path = _resolve_gguf(args.model)
    report: dict = {"path": str(path)}
    hf = args.hf or check_gguf(path).metadata.get(SOURCE_KEY)
    if hf and Path(hf).is_dir():
        report["tokenizer"] = verify.tokenizer_parity(Path(hf), path)
        kinds = {t.name for _s, t, _o, _n in check_gguf(path).tensors.values()}
        if kinds <= {"F32", "F16", "BF16"}:
            report["logits"] = verify.logits_parity(Path(hf), path)
    if args.against:
        report["quantization"] = _quant_report(_resolve_gguf(args.against), path, args.eval_text)
    if len(report) == 1:
        raise CLIError("nothing to verify: give --hf DIR (the source checkpoint) and/or --against BASE.gguf")
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    _report(args, report)
    return 0 if report["ok"] else 1


def _report(args, report: dict) -> None:
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return
    con = _console()
    for key in ("path", "outtype", "type", "tensors", "pre_tokenizer", "size_bytes", "rank", "alpha", "seconds",
                "imatrix_tensors", "registered_as"):
        if report.get(key) not in (None, ""):
            con.print(f"{key:16} {report[key]}")
    v = report.get("verify", report)
    tok = v.get("tokenizer")
    if tok:
        con.print(f"{'tokenizer':16} {'identical' if tok['ok'] else 'MISMATCH'} on {tok['probes']} probe texts")
        for m in tok["mismatches"][:3]:
            con.print(f"  {m['text']!r}: hf {m['hf'][:12]} vs gguf {m['gguf'][:12]}")
    lg = v.get("logits")
    if lg:
        worst = max(r["max_abs_diff"] for r in lg["sequences"])
        greedy = sum(r["greedy_equal"] for r in lg["sequences"])
        con.print(f"{'logits':16} max |diff| {worst:.4f}, greedy continuation equal on {greedy}/{len(lg['sequences'])}")
    q = v.get("quantization") or (v if ("mean_kld" in v or "skipped" in v) else None)
    if q:
        if "skipped" in q:
            con.print(f"{'quality':16} skipped: {q['skipped']}")
        else:
            con.print(f"{'quality':16} PPL {q['ppl_base']:.3f} -> {q['ppl_quant']:.3f}, mean KLD {q['mean_kld']:.4f}, "
                      f"same top token {100 * q['same_top_token']:.1f}% ({q['tokens_scored']} tokens of {q['text']})")
