"""A real `crofter serve` app on a loopback port, in a background thread (uvicorn), for tests
and the benchmark: `with LiveServer(options) as s: OpenAI(base_url=s.url, ...)`."""
from __future__ import annotations

import socket
import threading
import time


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def make_loader(n_ctx: int = 1024, seed: int = 1, threads: int = 1):
    """Loads a model the way the command does, with a small window (fast tests)."""
    def load(entry):
        from app.engine import Engine, LoadOptions

        if entry.kind == "remote":  # relayed to its server, as the command's loader does
            from app.remote import RemoteEngine

            return RemoteEngine.connect(entry)

        # One thread: on a shared 2-core machine a second llama.cpp thread spin-waits on a busy core.
        return Engine.load(entry, LoadOptions(n_ctx=n_ctx, seed=seed, threads=threads))

    return load


def gguf_scorer(path, n_ctx: int):
    from finetune.evaluate.llama_scorer import GGUFScorer

    return GGUFScorer(path, n_ctx=n_ctx, n_threads=1)


def options(**kw):
    from app.config import Settings
    from app.serve.options import ServeOptions

    kw.setdefault("settings", Settings(temperature=0.0, seed=1, max_tokens=32))
    kw.setdefault("loader", make_loader())
    kw.setdefault("scorer", gguf_scorer)
    return ServeOptions(**kw)


class LiveServer:
    """uvicorn serving `create_app(options)` on a free loopback port until closed."""

    def __init__(self, opts):
        import uvicorn

        from app.serve.app import create_app

        self.app = create_app(opts)
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
