"""The first load of a new model happens in a child process: a crash there costs nothing.

`check_gguf` refuses a malformed file, but a well-formed one can still kill
llama.cpp: its asserts abort the process (``llama.expert_used_count = 1`` with no
experts fails ``GGML_ASSERT(n_expert_used_max <= hparams.n_expert)`` in
llama-model.cpp), and a C++ exception thrown inside ``llama_tokenize`` ends it with
``std::terminate`` (a GPT-2 BPE vocabulary relabelled ``tokenizer.ggml.model =
"llama"`` loads, then dies on the first newline: SentencePiece's byte fallback looks
up ``<0x0A>`` with ``std::map::at``). Python cannot catch either.

So before the real load, `ensure_probed` loads the model in ``sys.executable -c``
with a tiny context, tokenizes a prompt with the characters every chat template
uses (newlines, digits, non-ASCII) and evaluates a few tokens. If the child dies or
fails, the registry entry is quarantined with the reason and the load is refused;
if it passes, the file's fingerprint is recorded and later loads go straight to
llama.cpp (a stat and a comparison: the chat path pays nothing).

    >>> ensure_probed(Registry().get("qwen-bad"))                       # doctest: +SKIP
    ProbeError: model failed to load in a test process: killed by SIGABRT (terminate
    called after throwing an instance of 'std::out_of_range'); quarantined — `crofter
    models rm qwen-bad` or re-add it
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from models.bundled import bundled_gguf
from models.registry import ModelEntry, Registry, fingerprint

PROBE_TIMEOUT_S = 600.0  # a large model on a slow disk takes minutes to map; a hang is not a verdict
PROBE_TEXT = "<|im_start|>user\nHello, 123 ünïcödé — 你好!\n\t<|im_end|>\n"

# Runs in the child: argv[1] is the model path. Exit 0 only when every step worked.
_CHILD = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_threads=1, n_threads_batch=1,
            n_gpu_layers=0, verbose=True)  # verbose: llama.cpp's own words reach our stderr
tokens = llm.tokenize(sys.argv[2].encode("utf-8"), add_bos=True, special=True)
tokens = tokens[:8]
if not tokens:
    raise SystemExit("the tokenizer returned no tokens for a short prompt")
llm.eval(tokens)
llm.detokenize(tokens)
print("probe ok", flush=True)
"""

# Lines of llama.cpp's stderr that say what went wrong, most telling first.
_TELLING = ("GGML_ASSERT", "terminate called", "error loading model", "Error", "error")


class ProbeError(RuntimeError):
    """The model crashed or failed its test load (or did so before); the message is for the user."""


def refusal(entry: ModelEntry, reason: str) -> str:
    return (f"model failed to load in a test process: {reason}; quarantined — "
            f"`crofter models rm {entry.name}` or re-add it")


def _reason(rc: int, stderr: str) -> str:
    """One line: how the child ended and the most telling line it printed."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    detail = ""
    for word in _TELLING:
        hits = [ln for ln in lines if word in ln]
        if hits:
            detail = hits[0] if word in ("GGML_ASSERT", "terminate called") else hits[-1]
            break
    if not detail and lines:
        detail = lines[-1]
    if rc < 0:
        try:
            how = f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            how = f"killed by signal {-rc}"
    else:
        how = f"exit status {rc}"
    detail = re.sub(r"\S*/vendor/", "", detail)[:240]  # the wheel's build path says nothing
    return f"{how} ({detail})" if detail else how


def run_probe(path: Path, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """Load `path` in a child process; "" when it loaded and ran, else the reason it did not.

    Raises ProbeError on a timeout (no verdict: the next load probes again)."""
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # no gdb attach on abort: seconds saved, no noise
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), PROBE_TEXT],
            capture_output=True, text=True, errors="replace", timeout=timeout_s, env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ProbeError(f"{path}: the test load did not finish within {timeout_s:.0f} s; try again") from None
    if done.returncode == 0 and "probe ok" in done.stdout:
        return ""
    return _reason(done.returncode, done.stderr)


def ensure_probed(entry: ModelEntry, registry: Registry | None = None) -> None:
    """Refuse a quarantined model; probe a GGUF not yet known to load cleanly.

    The bundled model and entries whose recorded fingerprint still matches the file
    return at once. A failure quarantines the registry entry (when `entry` is one)
    and raises ProbeError; the calling process is never at risk."""
    if entry.quarantine:
        raise ProbeError(refusal(entry, entry.quarantine))
    path = entry.file
    fp = fingerprint(path)
    if entry.probed == fp:
        return
    bundled = bundled_gguf()
    if bundled is not None and path.resolve() == bundled.resolve():
        return
    failure = run_probe(path)
    (registry or Registry()).record_probe(entry.name, entry.path, fp, failure)
    if failure:
        raise ProbeError(refusal(entry, failure))
