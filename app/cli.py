"""The `crofter` command line: the one place that wires every package together.

Every command imports what it needs inside its own function, so `crofter --help`
and `crofter ask --help` load nothing heavier than argparse.

Exit codes: 0 success, 1 runtime error (one line on stderr; the traceback only
with --debug), 2 usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import CLIError


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and hardware")
    g.add_argument("-m", "--model", help="registry name or path of a GGUF file (default: config `model`)")
    g.add_argument("--n-ctx", type=int, metavar="N", help="context window in tokens (0: the model's own, capped at 8192)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads (0: all available)")
    g.add_argument("--gpu-layers", type=int, metavar="N", help="layers on the GPU (-1: all if this build can offload, 0: CPU)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-t", "--temperature", type=float, metavar="T", help="0 is greedy (default: config)")
    g.add_argument("--top-p", type=float, metavar="P")
    g.add_argument("--top-k", type=int, metavar="K")
    g.add_argument("--min-p", type=float, metavar="P")
    g.add_argument("--repeat-penalty", type=float, metavar="R")
    g.add_argument("--seed", type=int, metavar="S", help="-1 for a random seed")
    g.add_argument("-n", "--max-tokens", type=int, metavar="N", help="most tokens in the reply")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when the reply contains TEXT (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crofter",
        description="A local LLM workbench: chat with GGUF models, offline, on your own machine.",
        epilog="Run `crofter COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"crofter {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    chat = sub.add_parser("chat", help="open the chat app (the default command)", description="Open the terminal chat app.")
    chat.add_argument("-m", "--model", help="registry name or path of a GGUF file (default: config `model`)")
    chat.add_argument("--chat", type=int, metavar="ID", help="open this saved chat (see `crofter chats list`)")
    chat.add_argument("--lora", metavar="A.gguf", help="apply a GGUF LoRA adapter (crofter convert-lora) to the model, unmerged")

    ask = sub.add_parser(
        "ask",
        help="answer one prompt and exit (streams to stdout)",
        description="Answer one prompt with a local model, streaming the reply to stdout.",
        epilog='Examples:  crofter ask "What is GGUF?"   |   echo "2+2?" | crofter ask - --json',
    )
    ask.add_argument("prompt", help="the prompt, or - to read it from stdin")
    ask.add_argument("-s", "--system", help="system prompt (default: config `system_prompt`)")
    ask.add_argument("--json", action="store_true", help="print one JSON object with text, usage and timings instead of streaming")
    ask.add_argument("--show-thinking", action="store_true",
                     help="print a reasoning model's <think> trace (to stderr) as well as the answer")
    ask.add_argument("--grammar-file", metavar="FILE", help="constrain the reply with a llama.cpp GBNF grammar")
    dg = ask.add_argument_group("documents")
    dg.add_argument("-c", "--collection", action="append", default=[], metavar="NAME",
                    help="answer from this document collection, with cited sources (repeatable)")
    dg.add_argument("-k", type=int, metavar="N", help="passages to retrieve (default: config `rag_top_k`)")
    dg.add_argument("--chroma-url", metavar="URL", help="Chroma server (http://HOST:PORT)")
    tg = ask.add_argument_group("tools")
    tg.add_argument("--tools", action="store_true", help="let the model call tools (calculator, current_time, and read_file/list_dir inside config `tool_roots`)")
    tg.add_argument("--allow-tool", action="append", default=[], metavar="NAME", help="run NAME without asking (repeatable)")
    tg.add_argument("--yes", action="store_true", help="approve every tool call that would otherwise be asked about")
    _add_load_flags(ask)
    ask.add_argument("--lora", metavar="A.gguf", help="apply a GGUF LoRA adapter (crofter convert-lora) to the model, unmerged")
    _add_sampling_flags(ask)

    models = sub.add_parser("models", help="list, inspect, add, remove and pull models", description="The local model store.")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ml = msub.add_parser("list", help="every registered model")
    ml.add_argument("--json", action="store_true", help="machine-readable output")
    mi = msub.add_parser("info", help="architecture, size, quantization, context of one model")
    mi.add_argument("name")
    mi.add_argument("--json", action="store_true", help="machine-readable output")
    ma = msub.add_parser("add", help="register a GGUF file or an HF checkpoint folder (validated first)")
    ma.add_argument("path")
    ma.add_argument("--name", help="registry name (default: from the file name)")
    mar = msub.add_parser(
        "add-remote", help="register a model of an OpenAI-compatible server (vLLM, llama-server, Ollama, crofter serve)",
        description="Chat with a model served elsewhere as with a local GGUF: the chat app, ask, tools and documents "
        "work with it. The server is checked (GET /models) unless --no-check; the API key is read from an "
        "environment variable at each use, never stored.",
        epilog="Example:  vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000   then   crofter models add-remote big "
        "--base-url http://gpu-box:8000/v1 --model Qwen/Qwen2.5-7B-Instruct")
    mar.add_argument("name")
    mar.add_argument("--base-url", required=True, metavar="URL", help="the server's OpenAI base URL, e.g. http://host:8000/v1")
    mar.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key (sent as Bearer)")
    mar.add_argument("--model", metavar="ID", help="the server's model id (default: the one model it offers)")
    mar.add_argument("--n-ctx", type=int, metavar="N", help="the server's context window (default: what it reports, else 4096)")
    mar.add_argument("--no-check", action="store_true", help="register without contacting the server")
    mr = msub.add_parser("rm", help="unregister a model (files crofter downloaded are deleted)")
    mr.add_argument("name")
    md = msub.add_parser("default", help="set the model used when none is named")
    md.add_argument("name")
    mp = msub.add_parser(
        "pull",
        help="download from the Hugging Face Hub: REPO, REPO:QUANT or REPO:FILENAME",
        description="Download a model from the Hugging Face Hub (HF_ENDPOINT is honoured). Only .gguf, "
        ".safetensors, .json and tokenizer files are fetched, never pickles; each file is checked against "
        "the Hub's checksum before it appears in the store.",
        epilog="Examples:  crofter models pull bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M   |   "
        "crofter models pull HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    mp.add_argument("spec", metavar="REPO[:QUANT|:FILENAME]")
    mp.add_argument("--name", help="registry name (default: from the repo and file)")
    mp.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    mp.add_argument("--json", action="store_true", help="print the registered entry as JSON")

    mdq = msub.add_parser("dequantize", help="a GGUF model -> an HF safetensors folder to fine-tune",
                          description="Dequantize a GGUF model (e.g. the bundled smollm2-135m) into an HF checkpoint "
                          "folder (float32, tokenizer and chat template kept) for `crofter tune` and journeys.")
    mdq.add_argument("name", help="store name or GGUF path")
    mdq.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist)")
    mdq.add_argument("--as", dest="as_name", metavar="NAME", help="store name for the folder (default: from --out)")
    mdq.add_argument("--no-register", action="store_true", help="do not add the folder to the model store")
    mdq.add_argument("--json", action="store_true", help="print the result as JSON")

    chats = sub.add_parser("chats", help="list, show, search, export and delete saved chats", description="The chat history.")
    chsub = chats.add_subparsers(dest="chats_command", metavar="ACTION", required=True)
    cl = chsub.add_parser("list", help="every chat, most recent first")
    cl.add_argument("--json", action="store_true", help="machine-readable output")
    csh = chsub.add_parser("show", help="one chat's messages")
    csh.add_argument("id", type=int)
    csh.add_argument("--json", action="store_true", help="machine-readable output")
    cse = chsub.add_parser("search", help="full-text search over every message")
    cse.add_argument("query")
    cse.add_argument("--limit", type=int, default=50)
    cse.add_argument("--json", action="store_true", help="machine-readable output")
    cex = chsub.add_parser("export", help="one chat as Markdown or JSON, or preference data from the chats",
                           description="Export one chat (ID), or the preferences the chat app recorded: "
                           "--prefs writes DPO pairs (a reply marked preferred vs each alternative a regenerate kept), "
                           "--marks the thumbs up/down replies (KTO-style prompt/completion/label).",
                           epilog="Example:  crofter chats export --prefs prefs.jsonl && crofter tune dpo --base HF_DIR --data prefs.jsonl")
    cex.add_argument("id", type=int, nargs="?", help="the chat to export (with --prefs/--marks: see --chat)")
    cex.add_argument("--format", choices=("md", "json"), default="md")
    cex.add_argument("-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    cex.add_argument("--prefs", metavar="FILE.jsonl", help="write preference pairs for `crofter tune dpo --data`")
    cex.add_argument("--marks", metavar="FILE.jsonl", help="write the thumbs-marked replies (prompt, completion, label)")
    cex.add_argument("--chat", type=int, action="append", default=[], metavar="ID",
                     help="only these chats (repeatable; default: every chat)")
    cex.add_argument("--with-compare", action="store_true", help="add the compare view's picks to --prefs")
    crm = chsub.add_parser("rm", help="delete chats")
    crm.add_argument("ids", type=int, nargs="+", metavar="ID")

    ing = sub.add_parser(
        "ingest",
        help="add files and folders to a document collection",
        description="Extract, chunk and embed documents (.txt .md .rst .html .pdf .docx and source code) into a "
        "collection. Unchanged files are skipped, changed files replaced, files gone from an ingested folder "
        "removed; unreadable files are reported as failed and the rest goes on.",
        epilog="Examples:  crofter ingest ~/notes --collection notes   |   crofter ingest paper.pdf -c papers --watch",
    )
    ing.add_argument("paths", nargs="+", metavar="PATH")
    ing.add_argument("-c", "--collection", default="default", help="collection name (default: default)")
    ing.add_argument("--watch", action="store_true", help="keep running and re-ingest when files change")
    ing.add_argument("--interval", type=float, default=2.0, metavar="S", help="--watch polling interval (default 2 s)")
    ing.add_argument("--embedder", metavar="NAME|DIR", help="embedding model for a new collection (default: config `embedder`)")
    ing.add_argument("--chunk-size", type=int, metavar="TOKENS", help="chunk size in embedder tokens for a new collection (default 128)")
    ing.add_argument("--chunk-overlap", type=int, metavar="TOKENS", help="overlap between chunks (default 24)")
    ing.add_argument("--chroma-url", metavar="URL", help="use a Chroma server (http://HOST:PORT) instead of the embedded store")
    ing.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")

    col = sub.add_parser("collections", help="list, inspect and remove document collections",
                         description="Document collections made by `crofter ingest`.")
    colsub = col.add_subparsers(dest="collections_command", metavar="ACTION", required=True)
    cll = colsub.add_parser("list", help="every collection with file and chunk counts")
    cll.add_argument("--json", action="store_true", help="machine-readable output")
    cli_ = colsub.add_parser("info", help="one collection's settings and files (failed ones with the reason)")
    cli_.add_argument("name")
    cli_.add_argument("--json", action="store_true", help="machine-readable output")
    clr = colsub.add_parser("rm", help="delete a collection's index (your files are not touched)")
    clr.add_argument("name")
    clb = colsub.add_parser("rebuild", help="re-embed collections from the catalogue after damage (all when none is named)")
    clb.add_argument("names", nargs="*", metavar="NAME")
    clf = colsub.add_parser("forget", help="drop the files at or under PATHs from a collection (your files are not touched)",
                            description="Drop from collection NAME every stored file at or under each PATH, whether it still "
                                        "exists or not (a folder deleted, moved away or no longer wanted). `crofter ingest` "
                                        "never drops a named folder that has gone missing: it may only be unmounted.")
    clf.add_argument("name")
    clf.add_argument("paths", nargs="+", metavar="PATH")
    clf.add_argument("--json", action="store_true", help="print the dropped paths as JSON")
    for p in (cll, cli_, clr, clb, clf):
        p.add_argument("--chroma-url", metavar="URL", help="Chroma server (http://HOST:PORT)")

    se = sub.add_parser("search", help="find passages in a collection",
                        description="Hybrid search: dense vectors and BM25 keywords (the title a field of its own), "
                        "fused by their z-scores, weighted 0.6 / 0.4; each passage once, shown with its neighbours. "
                        "A cross-encoder (--reranker, or the `reranker` setting) then re-reads the best 20 (4 x k when k > 5) with the query.")
    se.add_argument("query")
    se.add_argument("-c", "--collection", default="default", help="collection name (default: default)")
    se.add_argument("-k", type=int, default=5, metavar="N", help="number of passages (default 5)")
    se.add_argument("--mode", choices=("hybrid", "dense", "keyword"), default="hybrid", help="retrieval mode (default hybrid)")
    se.add_argument("--chroma-url", metavar="URL", help="Chroma server (http://HOST:PORT)")
    se.add_argument("--reranker", metavar="NAME|DIR", help="cross-encoder to reorder the hits: a model store name "
                    "(`crofter models pull cross-encoder/ms-marco-MiniLM-L6-v2`) or a folder; none: off "
                    "(default: the `reranker` setting)")
    se.add_argument("--json", action="store_true",
                    help='print a list of {"source", "page", "heading", "start", "end", "text", "score"}')

    cv = sub.add_parser(
        "convert", help="HF safetensors checkpoint -> GGUF (verified, registered in the model store)",
        description="Convert an HF checkpoint (Llama, Mistral, Qwen2 families and GPT-2; byte-level BPE and SentencePiece tokenizers) to GGUF "
        "with no llama.cpp build. Afterwards the tokenizer is checked on a probe corpus and, for f32/f16/bf16, the "
        "logits and greedy continuation are compared with transformers.",
        epilog="Example:  crofter convert ./my-finetune --outtype f16 && crofter quantize my-finetune-f16 --type Q4_K_M")
    cv.add_argument("hf_dir", metavar="HF_DIR", help="checkpoint folder or the store name of an HF model")
    cv.add_argument("--out", metavar="M.gguf", help="output file (default: the model store)")
    cv.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16", help="weight type (default f16)")
    cq = sub.add_parser(
        "quantize", help="GGUF -> Q4_K_M (or Q4_K_S, Q5_K_M, Q6_K, Q8_0), optionally calibrated",
        description="Quantize with llama.cpp's own quantizer. --calibration computes an importance matrix from a "
        "text file on the HF model (found from the GGUF's metadata, or --hf). Afterwards perplexity, mean KL "
        "divergence and same-top-token rate against the input are reported on --eval-text.",
        epilog="Example:  crofter quantize smol-F16.gguf --type Q4_K_M --calibration notes.txt")
    cq.add_argument("input", metavar="IN.gguf", help="an F32/F16/BF16 GGUF file or store name")
    cq.add_argument("output", metavar="OUT.gguf", nargs="?", help="output file (default: next to the input)")
    cq.add_argument("--type", default="Q4_K_M", choices=("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0"))
    cq.add_argument("--calibration", metavar="TEXT_FILE", help="text for the importance matrix")
    cq.add_argument("--hf", metavar="DIR", help="the HF checkpoint the GGUF came from (for --calibration)")
    cq.add_argument("--eval-text", metavar="FILE", help="text for the quality report (default: a license text on the machine)")
    cq.add_argument("--threads", type=int, metavar="N", help="quantizer threads (default: all)")
    cl = sub.add_parser("convert-lora", help="peft LoRA adapter -> GGUF adapter for llama.cpp",
                        description="Convert a peft LoRA adapter (safetensors) to a GGUF adapter (rsLoRA scaling "
                        "handled; DoRA and new-token adapters are refused: merge those instead).")
    cl.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    cl.add_argument("--base", required=True, metavar="HF_DIR", help="the base checkpoint the adapter was trained on")
    cl.add_argument("--out", metavar="A.gguf", help="output file (default: ADAPTER_DIR.gguf)")
    cver = sub.add_parser("verify", help="check a GGUF against its HF source or its unquantized base",
                          description="Tokenizer parity and logits parity against the HF checkpoint; with --against, "
                          "PPL, mean KLD and same-top-token rate against another GGUF.")
    cver.add_argument("model", metavar="MODEL.gguf")
    cver.add_argument("--hf", metavar="DIR", help="source checkpoint (default: from the GGUF's metadata)")
    cver.add_argument("--against", metavar="BASE.gguf", help="unquantized GGUF to compare with")
    cver.add_argument("--eval-text", metavar="FILE", help="text for the quality comparison")
    for p in (cv, cq):
        p.add_argument("--name", help="store name to register the result under (default: from the file name)")
        p.add_argument("--no-register", action="store_true", help="do not add the result to the model store")
        p.add_argument("--no-verify", action="store_true", help="skip the checks that run after writing")
    for p in (cv, cq, cl, cver):
        p.add_argument("--json", action="store_true", help="print the report as JSON")

    imp = sub.add_parser("import", help="bring your own model in: a nanoGPT ckpt.pt -> an HF GPT-2 folder",
                         description="Import a checkpoint trained outside crofter into an HF folder that `crofter "
                         "convert` and `crofter tune` take.")
    isub = imp.add_subparsers(dest="import_command", metavar="FORMAT", required=True)
    ing_ = isub.add_parser(
        "nanogpt", help="a nanoGPT checkpoint (model, model_args) -> GPT2LMHeadModel safetensors + tokenizer",
        description="Read a nanoGPT ckpt.pt with torch.load(weights_only=True) (checkpoints needing arbitrary "
        "unpickling are refused), strip torch.compile's _orig_mod. prefix, transpose the Linear weights into HF's "
        "Conv1D, give bias=False models zero biases, tie lm_head, and drop nanoGPT's vocabulary padding rows "
        "(50304 -> the tokenizer's 50257) so model and tokenizer agree.",
        epilog="Example:  crofter import nanogpt out/ckpt.pt --tokenizer ~/gpt2-tokenizer --out my-gpt2 && "
        "crofter convert my-gpt2")
    ing_.add_argument("checkpoint", metavar="CKPT.pt")
    ing_.add_argument("--tokenizer", required=True, metavar="DIR", help="the HF tokenizer folder the model was trained with")
    ing_.add_argument("--out", required=True, metavar="HF_DIR", help="the folder to write (must not exist)")
    ing_.add_argument("--json", action="store_true", help="print the report as JSON")
    ing_.add_argument("--name", help="store name to register the folder under (default: from --out)")
    ing_.add_argument("--no-register", action="store_true", help="do not add the folder to the model store")

    from .commands.tune_parser import add_parser as add_tune_parser  # argparse only: torch/TRL wait for run()

    add_tune_parser(sub)

    from .commands.evaluate import add_parser as add_eval_parser  # argparse only: heavy imports wait for run()

    add_eval_parser(sub)

    from .commands.serve import add_parser as add_serve_parser  # argparse only: fastapi/uvicorn wait for run()

    add_serve_parser(sub)

    from .commands.journey import add_parser as add_journey_parser  # argparse only

    add_journey_parser(sub)

    cfg = sub.add_parser("config", help="show or change settings", description="Settings live in a TOML file; flags override them.")
    csub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cs = csub.add_parser("show", help="every setting with its value and meaning")
    cs.add_argument("--json", action="store_true", help="machine-readable output")
    cset = csub.add_parser("set", help="change one setting, e.g. `config set temperature 0.2`")
    cset.add_argument("key")
    cset.add_argument("value")
    csub.add_parser("path", help="print where the config file lives")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        if args.command in (None, "chat"):
            from .tui.app import CrofterApp

            lora = getattr(args, "lora", None)
            if lora and not Path(lora).expanduser().is_file():
                raise CLIError(f"--lora {lora}: no such file (a GGUF adapter: crofter convert-lora ADAPTER --base HF_DIR)")
            CrofterApp(model=getattr(args, "model", None), chat_id=getattr(args, "chat", None),
                       lora=Path(lora).expanduser() if lora else None).run()
            return 0
        if args.command == "ask":
            from .commands.ask import run
        elif args.command == "models":
            from .commands.models import run
        elif args.command == "chats":
            from .commands.chats import run
        elif args.command == "ingest":
            from .commands.docs import run_ingest as run
        elif args.command == "collections":
            from .commands.docs import run_collections as run
        elif args.command == "search":
            from .commands.docs import run_search as run
        elif args.command == "tune":
            from .commands.tune import run
        elif args.command == "import":
            from .commands.importing import run
        elif args.command == "convert":
            from .commands.convert import run_convert as run
        elif args.command == "quantize":
            from .commands.convert import run_quantize as run
        elif args.command == "convert-lora":
            from .commands.convert import run_convert_lora as run
        elif args.command == "verify":
            from .commands.convert import run_verify as run
        elif args.command == "eval":
            from .commands.evaluate import run
        elif args.command == "serve":
            from .commands.serve import run
        elif args.command == "journey":
            from .commands.journey import run
        else:
            from .commands.config import run
        return run(args) or 0
    except KeyboardInterrupt:
        print("crofter: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # the one place that turns errors into one line
        if args.debug:
            raise
        name = "" if _is_user_error(exc) else f"{type(exc).__name__}: "
        print(f"crofter: error: {name}{exc}", file=sys.stderr)
        if name:
            print("crofter: run with --debug for the traceback", file=sys.stderr)
        return 1


def _is_user_error(exc: Exception) -> bool:
    """Errors whose message is already written for the user (no exception name needed)."""
    from app.budget import ContextOverflow
    from app.config import ConfigError
    from app.engine import EngineError
    from app.history import HistoryError
    from app.probe import ProbeError
    from models.gguf_check import GGUFError
    from models.safetensors_check import SafetensorsError
    from models.hub import HubError
    from models.registry import ModelError
    from converter.hf import ConvertError
    from rag.embed import EmbedError  # light modules: heavy imports happen inside their functions
    from rag.store import RagError
    from finetune.evaluate.rows import EvalError

    known = (CLIError, ContextOverflow, ConfigError, EngineError, GGUFError, HistoryError, HubError, ModelError,
             RagError, EmbedError, ConvertError, ProbeError, SafetensorsError, EvalError, FileNotFoundError, PermissionError)
    return isinstance(exc, known)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
