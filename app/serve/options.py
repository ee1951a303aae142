"""What `crofter serve` was started with (the command's flags, or a test's choices)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
STREAM_INTERVAL_S = 0.05  # a streamed reply's text goes out at most this often (the first piece at once)
BODY_LIMIT = 10 * 1024 * 1024  # bytes; a larger request body gets a 413 before it is read whole


@dataclass
class ServeOptions:
    """How the server behaves. `loader(entry) -> Engine` loads a model (the command passes one
    built from Settings); `scorer(path, n_ctx)` makes a prompt scorer with `predict(tokens,
    start) -> logits` for /v1/completions logprobs (None: prompt logprobs are refused)."""

    settings: object
    """config.Settings: the default sampling, n_ctx, embedder and store location."""
    loader: Callable
    """entry -> app.engine.Engine, called on a worker thread the first time a model is used."""
    models: list[str] = field(default_factory=list)
    """Registry names the server offers; empty: every GGUF and remote model in the store."""
    api_key: str = ""
    """When set, every request needs `Authorization: Bearer <api_key>`."""
    cors: list[str] = field(default_factory=list)
    """Origins allowed by CORS; empty: no CORS headers at all."""
    max_models: int = 1
    """Engines resident at once; the least recently used idle one is closed to load another."""
    queue: int = 32
    """Requests that may wait for one model besides the one running; more get a 429."""
    body_limit: int = BODY_LIMIT
    """Largest request body in bytes (413 above it)."""
    scorer: Callable | None = None
    """(gguf path, n_ctx) -> a scorer (finetune.evaluate.llama_scorer.GGUFScorer), made per model on first use."""
    retry_after_s: int = 1
    """The Retry-After a 429 carries."""
    allow_tools: list[str] = field(default_factory=list)
    """crofter tools a request's `crofter.tools` may run: those with side effects and those
    that read the user's files run only if named here; other read-only ones (calculator,
    clock, document search) run anyway."""
    hosts: list[str] = field(default_factory=lambda: list(LOCAL_HOSTS))
    """Host names the server answers (any port; *.localhost and a request without Host too);
    empty: any. A loopback server answers only its own names, so a web page that rebinds its
    DNS name to 127.0.0.1 cannot reach it."""

    stream_interval: float = STREAM_INTERVAL_S
    """Seconds a streamed reply's text is gathered before it goes out as one chunk (the first
    piece goes at once; 0: every token as it comes)."""

    def __post_init__(self) -> None:
        if self.max_models < 1:
            raise ValueError(f"max_models: must be at least 1, not {self.max_models}")
        if self.queue < 0:
            raise ValueError(f"queue: must be 0 or more, not {self.queue}")
        if not 0 <= self.stream_interval <= 10:
            raise ValueError(f"stream_interval: must be 0..10 s, not {self.stream_interval}")
