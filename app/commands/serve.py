"""`crofter serve`: the store's models behind an OpenAI-compatible HTTP API.

    $ crofter serve --port 8080 --models smollm2-135m --api-key "$KEY"
    $ curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8080/v1/models

Binds to loopback unless told otherwise. FastAPI and uvicorn are imported here, inside the
command, so `crofter ask --help` stays light; the prompt scorer for /v1/completions logprobs
(finetune's GGUFScorer) is wired here too, lazily, as the CLI wires every package.
"""
from __future__ import annotations

import logging
import os
import sys

from ..errors import CLIError

from ..serve.options import LOCAL_HOSTS as LOOPBACK


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve models over an OpenAI-compatible HTTP API",
        description="An OpenAI-compatible server (/v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings) "
        "over the model store. One engine per model, loaded on first use; requests for a model wait in line.",
        epilog="Example:  crofter serve --models smollm2-135m --api-key secret   then   "
        "OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=secret your-client")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: any free port)")
    p.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY (default: env CROFTER_API_KEY)")
    p.add_argument("--models", metavar="A,B", help="offer only these store names (default: every GGUF and remote model)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help="allow this browser origin (repeatable; default: no CORS)")
    p.add_argument("--max-models", type=int, default=1, metavar="N", help="engines resident at once (default 1)")
    p.add_argument("--queue", type=int, default=32, metavar="N", help="requests that may wait per model before 429 (default 32)")
    p.add_argument("--stream-interval", type=int, default=50, metavar="MS",
                   help="gather a streamed reply's text for MS ms per chunk (default 50; 0: every token; the first goes at once)")
    p.add_argument("--allow-tool", action="append", default=[], metavar="NAME",
                   help="let requests' crofter.tools run this crofter tool (repeatable); tools with side effects "
                   "and the file readers (read_file, list_dir) are denied unless named here, the calculator, "
                   "clock and document search run anyway")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to this Host name on a loopback server (repeatable: a "
                   "reverse proxy or tunnel that passes its own name on); localhost, 127.0.0.1, [::1] and "
                   "*.localhost always are")
    g = p.add_argument_group("model and hardware")
    g.add_argument("--n-ctx", type=int, metavar="N", help="context window per model (default: config `n_ctx`)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads (0: all available)")
    g.add_argument("--gpu-layers", type=int, metavar="N", help="layers on the GPU (-1: all if this build can offload)")


def options_from_args(args):
    """ServeOptions from the flags (checked: a bad one is a one-line error)."""
    from .. import config
    from ..serve.options import ServeOptions

    settings = config.load().replace(n_ctx=args.n_ctx, threads=args.threads, gpu_layers=args.gpu_layers)
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port {args.port}: must be 0..65535")
    if args.max_models < 1:
        raise CLIError(f"--max-models {args.max_models}: must be at least 1")
    if args.queue < 0:
        raise CLIError(f"--queue {args.queue}: must be 0 or more")
    if not 0 <= args.stream_interval <= 10_000:
        raise CLIError(f"--stream-interval {args.stream_interval}: must be 0..10000 ms")
    names = [n.strip() for n in (args.models or "").split(",") if n.strip()]
    if names:
        from models.registry import Registry

        reg = Registry()
        for n in names:
            entry = reg.get(n)  # ModelError with a suggestion
            if entry.kind not in ("gguf", "remote"):
                raise CLIError(f"--models {n}: an HF checkpoint; serve needs a GGUF (run `crofter convert`) or a remote model")
    if args.allow_tool:
        from ..tools.registry import ToolRegistry

        have = ToolRegistry.for_settings(settings).tools
        unknown = [n for n in args.allow_tool if n not in have]
        if unknown:
            raise CLIError(f"--allow-tool {unknown[0]}: no such tool (have: {', '.join(sorted(have)) or 'none'})")
    api_key = args.api_key if args.api_key is not None else os.environ.get("CROFTER_API_KEY", "")
    return ServeOptions(settings=settings, loader=loader(settings), models=names, api_key=api_key, cors=list(args.cors),
                        max_models=args.max_models, queue=args.queue, stream_interval=args.stream_interval / 1000,
                        scorer=scorer, allow_tools=list(args.allow_tool),
                        hosts=[*LOOPBACK, *args.allow_host] if args.host in LOOPBACK else [])  # elsewhere: any name


def loader(settings):
    def load(entry):
        from ..chat import default_loader

        return default_loader(entry, settings)

    return load


def scorer(path, n_ctx: int):
    """A prompt scorer for one model: finetune's GGUFScorer (its own llama.cpp context)."""
    from finetune.evaluate.llama_scorer import GGUFScorer

    from ..engine import auto_gpu_layers

    return GGUFScorer(path, n_ctx=n_ctx, gpu_layers=auto_gpu_layers(-1))


def run(args) -> int:
    options = options_from_args(args)
    import uvicorn

    from ..serve.app import create_app

    if args.host not in LOOPBACK:
        note = "" if options.api_key else " with no --api-key: anyone who can reach it can use it"
        print(f"crofter: warning: serving on {args.host}{note}", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(options)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"crofter: serving {', '.join(sorted(app.state.pool.entries)) or 'no models'} on "
          f"http://{shown}:{port}/v1", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0


def _bind(host: str, port: int):
    """The listening socket (bound here, so --port 0 can say which port it got)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
