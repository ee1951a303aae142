"""`crofter convert`, `crofter quantize`, `crofter convert-lora` and `crofter verify`."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from converter.hf import ConvertError  # a light module (json, dataclasses): the CLI already imports it

from ..errors import CLIError

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


class VerifyError(ConvertError):
    """A written model failed its checks; the message carries the figures and where the file is."""


@contextlib.contextmanager
def _outcome(out: Path):
    """Turn any failure while producing `out` into one line that also says what became of `out`:
    nothing written there, or the previous file there unchanged (read from the disk, not assumed)."""
    from models.gguf_check import GGUFError
    from models.registry import ModelError

    before = _identity(out)
    try:
        yield
    except (VerifyError, KeyboardInterrupt):
        raise
    except Exception as exc:
        after = _identity(out)
        if after is None:
            state = f"nothing written at {out}"
        elif after == before:
            state = f"the previous {out} is unchanged"
        else:
            state = f"{out} was replaced"  # pragma: no cover - outputs are committed only when complete
        known = isinstance(exc, (ConvertError, CLIError, GGUFError, ModelError, FileNotFoundError, PermissionError))
        # A ConvertError, not a CLIError: under `python -m app.cli` the CLI's own module is __main__,
        # and app.cli.CLIError is then a different class from the one it maps to one line.
        raise ConvertError(f"{'' if known else type(exc).__name__ + ': '}{exc}; {state}") from exc


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def run_convert(args) -> int:
    _quiet(args)
    from converter.convert import convert
    from models import paths

    hf = _resolve_hf(args.hf_dir)
    out = Path(args.out) if args.out else paths.models_dir() / f"{hf.name}-{args.outtype.upper()}.gguf"
    # A verified conversion is written beside `out` and moved there only once it passes, so a failed
    # check never replaces a good file (or the file a registered name points at).
    staged = out if args.no_verify else out.with_name(f"{out.stem}.unverified{out.suffix or '.gguf'}")
    with _outcome(out):
        bar = _progress(args, "convert")
        if bar:
            with bar:
                task = bar.add_task("convert", total=None, what="")
                result = convert(hf, staged, args.outtype,
                                 on_tensor=lambda i, n, name: bar.update(task, completed=i, total=n, what=name))
        else:
            result = convert(hf, staged, args.outtype)
        report = {"path": str(result.path), "outtype": result.outtype, "tensors": result.tensors,
                  "pre_tokenizer": result.pre_tokenizer, "seconds": round(result.seconds, 2)}
        if not args.no_verify:
            report["verify"] = _checked(lambda: _verify_converted(hf, staged, args.outtype), staged)
            if not report["verify"]["ok"]:
                _report(args, {**report, "registered_as": None})
                raise VerifyError(f"verification failed: {failure_summary(report['verify'])}; kept at {staged}, "
                                  f"not registered" + (f" ({out} left as it was)" if out.exists() else ""))
            from models.atomic import commit

            commit(staged, out)
            report["path"] = str(out)
    report["registered_as"] = _register(out, args.name, args)
    _report(args, report)
    return 0


def _checked(run, staged: Path) -> dict:
    """Run a verification; a crash inside it is a failed check, reported like one."""
    try:
        return run()
    except Exception as exc:
        raise VerifyError(f"verification could not run ({type(exc).__name__}: {exc}); kept at {staged}, "
                          "not registered") from exc


def failure_summary(v: dict) -> str:
    """One clause per failed check, with its figures: the body of the one error line."""
    parts = []
    tok = v.get("tokenizer")
    if tok and not tok["ok"]:
        first = tok["mismatches"][0]["text"]
        parts.append(f"tokenizer differs from the source on {len(tok['mismatches'])}/{tok['probes']} probe texts "
                     f"(first: {first[:40]!r})")
    lg = v.get("logits")
    if lg and not lg["ok"]:
        others = [fig for prefix, fig in (("top-1", f"top-1 {lg['top1_agree']:.3f}"),
                                          ("max |logit diff|", f"max |diff| {lg['max_abs_diff']:.3g}"),
                                          ("mean KL", f"KL {lg['mean_kl']:.3g}"))
                  if not any(f.startswith(prefix) for f in lg["failures"])]
        parts.append(f"{lg['outtype']} logits: {', '.join(lg['failures'])} "
                     f"({', '.join(others + [str(lg['positions']) + ' positions'])})")
    return "; ".join(parts) or "a check failed"


def _verify_converted(hf: Path, path: Path, outtype: str) -> dict:
    from converter import verify

    out = {"tokenizer": verify.tokenizer_parity(hf, path), "logits": verify.logits_parity(hf, path, outtype=outtype)}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def run_quantize(args) -> int:
    _quiet(args)
    from converter.quantize import SOURCE_KEY, quantize

    inp = _resolve_gguf(args.input)
    out = Path(args.output) if args.output else inp.with_name(
        inp.name.replace("-F16", "").replace("-F32", "").replace("-BF16", "").removesuffix(".gguf") + f"-{args.type}.gguf")
    # Read the evaluation text first: a bad --eval-text must fail before anything is written.
    eval_text = None if args.no_verify else _eval_text(args.eval_text)
    with _outcome(out):
        imatrix = None
        if args.calibration:
            from converter.imatrix import compute_imatrix
            from models.gguf_check import check_gguf

            hf = args.hf or check_gguf(inp).metadata.get(SOURCE_KEY)
            if not hf or not Path(hf).is_dir():
                raise ConvertError(f"--calibration needs the HF checkpoint {inp.name} came from: pass --hf DIR")
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
        report["verify"] = _quant_report(inp, result.path, eval_text)
    report["registered_as"] = _register(result.path, args.name, args)
    _report(args, report)
    return 0


def _eval_text(path: str | None) -> tuple[str, str] | None:
    """(path, text) for the quality report: --eval-text, else a license text on the machine."""
    path = path or next((p for p in DEFAULT_EVAL_TEXTS if Path(p).is_file()), None)
    if path is None:
        return None
    try:
        return path, Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConvertError(f"--eval-text {path}: {exc.strerror or exc}") from None


def _quant_report(base: Path, quant: Path, eval_text: tuple[str, str] | None) -> dict:
    """Perplexity, KL and same-top-token rate of `quant` against `base`: information, not a verdict
    (how much a 4-bit model may drift is the user's call; the figures let them make it)."""
    from converter.verify import quant_report

    if eval_text is None:
        return {"skipped": "no evaluation text: pass --eval-text FILE"}
    path, text = eval_text
    try:
        return {"text": path, **quant_report(base, quant, text, max_tokens=2048)}
    except ValueError as exc:
        return {"text": path, "skipped": str(exc)}


def run_convert_lora(args) -> int:
    _quiet(args)
    from converter.lora import convert_lora

    from models.adapters import resolve_adapter
    adapter = resolve_adapter(args.adapter_dir)  # an adapter folder, or a `crofter tune` run folder
    out = Path(args.out) if args.out else adapter.parent / f"{adapter.name}.gguf"
    with _outcome(out):
        r = convert_lora(adapter, _resolve_hf(args.base), out)
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
        if verify.gguf_outtype(path):
            report["logits"] = verify.logits_parity(Path(hf), path)
    if args.against:
        report["quantization"] = _quant_report(_resolve_gguf(args.against), path, _eval_text(args.eval_text))
    if len(report) == 1:
        raise ConvertError("nothing to verify: give --hf DIR (the source checkpoint) and/or --against BASE.gguf")
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    _report(args, report)
    if not report["ok"]:
        raise VerifyError(f"verification failed: {failure_summary(report)} (against {hf}); {path} and its "
                          "registration are unchanged")
    return 0


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
        con.print(f"{'logits':16} {'within' if lg['ok'] else 'OUTSIDE'} {lg['outtype']} tolerance: top-1 "
                  f"{lg['top1_agree']:.3f}, max |diff| {lg['max_abs_diff']:.4f}, mean KL {lg['mean_kl']:.2g} over "
                  f"{lg['positions']} positions")
        con.print(f"{'greedy':16} continuation equal on {lg['greedy_equal']}/{len(lg['sequences'])} "
                  "(information: near-ties may flip)")
    q = v.get("quantization") or (v if ("mean_kld" in v or "skipped" in v) else None)
    if q:
        if "skipped" in q:
            con.print(f"{'quality':16} skipped: {q['skipped']}")
        else:
            con.print(f"{'quality':16} PPL {q['ppl_base']:.3f} -> {q['ppl_quant']:.3f}, mean KLD {q['mean_kld']:.4f}, "
                      f"same top token {100 * q['same_top_token']:.1f}% ({q['tokens_scored']} tokens of {q['text']})")
