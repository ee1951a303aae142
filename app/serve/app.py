"""The FastAPI app: routes, and the ASGI layer every request passes (slashes, auth, logging).

    >>> app = create_app(ServeOptions(settings=Settings(), loader=load))   # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8080)                      # doctest: +SKIP

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions,
POST /v1/embeddings, GET /health. Every error is in OpenAI's shape (errors.py). The ASGI
middleware is plain ASGI, not BaseHTTPMiddleware, so streaming and disconnects pass through.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import time

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from . import chat as chat_mod
from . import completions as comp_mod
from .client_tools import ToolNames
from .embeddings import Embeddings
from .errors import ApiError, error_body, from_exception
from .flow import Finishes, rest, start
from .jobs import ClientGone
from .options import STREAM_INTERVAL_S, ServeOptions
from .pool import ModelPool
from .requests import ChatRequest, CompletionRequest, EmbeddingRequest, parse, read_json

log = logging.getLogger("crofter.serve")
_SLASHES = re.compile(r"/{2,}")


def host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8080" -> "::1", "Localhost." -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class Gate:
    """ASGI middleware: `//v1//models/` is `/v1/models`; a Host header not in `hosts` (when
    given) gets a 421; `Authorization: Bearer KEY` when a key is set (401 otherwise, in
    OpenAI's shape); one log line per request with its latency."""

    def __init__(self, app, api_key: str = "", hosts: list[str] | None = None):
        self.app = app
        self.api_key = api_key
        self.hosts = {host_name(h) for h in hosts or []}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _SLASHES.sub("/", scope["path"])
        if len(path) > 1:
            path = path.rstrip("/")
        scope = dict(scope, path=path, raw_path=path.encode("utf-8"))
        t0 = time.perf_counter()
        status = {"code": 0}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if self.hosts and not self._answers(host):
                body = error_body(421, f"Host {host!r} is not this server's name (it answers {', '.join(sorted(self.hosts))} "
                                  "and *.localhost; add a name with --allow-host NAME)", code="misdirected_request")
                return await JSONResponse(body, status_code=421)(scope, receive, sending)
            if self.api_key and scope["method"] != "OPTIONS" and not self._authorized(scope):
                body = error_body(401, "invalid API key: send Authorization: Bearer <key>", code="invalid_api_key")
                return await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, sending)
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %d %.1f ms", client[0], scope["method"], path, status["code"] or 499,
                     (time.perf_counter() - t0) * 1000)

    def _answers(self, host: str) -> bool:
        """A request with no Host (HTTP/1.0: never a browser's) or one of the server's names."""
        name = host_name(host)
        return not host.strip() or name in self.hosts or name.endswith(".localhost")

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


SERVED_KINDS = ("gguf", "remote")


def served_entries(names: list[str]) -> dict:
    """name -> ModelEntry of the models the server offers (`names`: only those): the store's
    GGUF models and its remote ones (a remote model's requests are relayed to its server)."""
    from models.registry import Registry

    entries = {e.name: e for e in Registry().entries() if e.kind in SERVED_KINDS and not e.quarantine}
    return {n: entries[n] for n in names if n in entries} if names else entries


def create_app(options: ServeOptions) -> FastAPI:
    """The server for `options` (no socket: uvicorn, or a test, serves it)."""
    pool = ModelPool(served_entries(options.models), options.loader, options.max_models, options.queue, options.retry_after_s)
    finishes = Finishes()
    embeddings = Embeddings(options.settings.embedder, options.settings.embed_backend)
    tool_names = ToolNames(options.settings)
    docs_holder: dict = {}

    def docs():
        if "docs" not in docs_holder:
            from ..documents import DocsService

            docs_holder["docs"] = DocsService(options.settings)
        return docs_holder["docs"]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await anyio.to_thread.run_sync(pool.close_all)
        if "docs" in docs_holder:
            docs_holder["docs"].close()

    app = FastAPI(title="crofter", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.pool, app.state.finishes, app.state.options = pool, finishes, options

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(error_body(400, f"{where}: {first['msg']}", where), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        err = from_exception(exc)
        if err.status >= 500:
            log.exception("unexpected error")
        return err.response()

    def refresh(name: str) -> None:
        if name not in pool.entries:
            pool.entries = served_entries(options.models)

    def model_card(name: str, entry=None) -> dict:
        return {"id": name, "object": "model", "created": int(getattr(entry, "added", 0) or 0), "owned_by": "crofter",
                "crofter": {"kind": "embedding" if entry is None else "chat",
                            **({"source": entry.source, "resident": name in pool.resident()} if entry else {})}}

    @app.get("/health")
    async def health():
        return {"status": "ok", "resident": pool.resident()}

    @app.get("/v1/models")
    async def list_models():
        pool.entries = served_entries(options.models)
        data = [model_card(n, e) for n, e in pool.entries.items()] + [model_card(embeddings.name)]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        refresh(model_id)
        if model_id == embeddings.name:
            return model_card(model_id)
        if model_id not in pool.entries:
            raise ApiError(404, f"model {model_id!r} does not exist", "model", "model_not_found")
        return model_card(model_id, pool.entries[model_id])

    async def answer(request, req, make, whole, first, for_event):
        """Run `make` on the model's line; the whole answer as one JSON body, or SSE events
        (`first`, then `for_event(ev)` for each event); 499 if the client left first."""
        try:
            started = await start(pool, request, req.model, make)
        except ClientGone:
            return Response(status_code=499)
        if not req.stream:
            events = await _rest_or_gone(started, request)
            return Response(status_code=499) if events is None else JSONResponse(whole(events))
        return EventSourceResponse(_sse(started, first, for_event), sep="\n")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await read_json(request, options.body_limit))
        refresh(req.model)
        plan = chat_mod.ChatPlan(req, options.settings, docs if req.crofter and req.crofter.collections else None,
                                 options.allow_tools)
        if plan.builtin:  # an unknown crofter tool is a 400 now, not after the wait in line
            await anyio.to_thread.run_sync(tool_names.check, plan.builtin)
        cid = chat_mod.new_id()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def make(engine, cancel, slot):
            events = _recorded(plan.events(engine, cancel), finishes, cid, "chat", req.model)
            return coalesced(events, options.stream_interval) if req.stream else _finals(events)

        chunks = chat_mod.Chunks(req.model, cid, include_usage)
        return await answer(request, req, make, lambda events: chat_mod.completion(events[-1], req.model, cid),
                            chunks.first(), chunks.for_event)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request, options.body_limit))
        refresh(req.model)
        plan = comp_mod.CompletionPlan(req, options.settings, options.scorer)
        cid = chat_mod.new_id("cmpl")

        def make(engine, cancel, slot):
            events = _recorded(plan.events(engine, cancel, slot), finishes, cid, "completions", req.model)
            return coalesced(events, options.stream_interval) if req.stream else _finals(events)

        def for_event(ev):
            if isinstance(ev, comp_mod.TextPiece):
                return [comp_mod.chunk(req.model, cid, ev.index, ev.text)]
            return [comp_mod.chunk(req.model, cid, ev.index, "", ev.choice["finish_reason"])]

        def whole(events):
            return comp_mod.body([e for e in events if isinstance(e, comp_mod.ChoiceDone)], req.model, cid)

        return await answer(request, req, make, whole, None, for_event)

    @app.post("/v1/embeddings")
    async def embed(request: Request):
        req = parse(EmbeddingRequest, await read_json(request, options.body_limit))
        return JSONResponse(await anyio.to_thread.run_sync(embeddings.run, req))

    app.add_middleware(Gate, api_key=options.api_key, hosts=options.hosts)
    if options.cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=options.cors, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _recorded(events, finishes: Finishes, cid: str, endpoint: str, model: str):
    """The job's events, with how each generation ended written down (even when the client
    that asked has gone)."""
    from ..turn import Done

    try:
        for ev in events:
            if isinstance(ev, Done):
                finishes.add(id=cid, endpoint=endpoint, model=model, finish_reason=ev.finish_reason,
                             completion_tokens=ev.result.completion_tokens if ev.result else 0)
            elif isinstance(ev, comp_mod.ChoiceDone):
                finishes.add(id=cid, endpoint=endpoint, model=model, finish_reason=ev.finish_reason,
                             completion_tokens=ev.result.completion_tokens if ev.result else 0)
            yield ev
    except Exception as exc:
        finishes.add(id=cid, endpoint=endpoint, model=model, finish_reason=f"error: {type(exc).__name__}", completion_tokens=0)
        raise


def _joined(a, b):
    """`a` and `b` as one piece of text, or None when they do not merge (another kind, another choice)."""
    from ..turn import TextDelta, ThinkingDelta

    if type(a) is not type(b):
        return None
    if isinstance(a, (TextDelta, ThinkingDelta)):
        return type(a)(a.text + b.text)
    if isinstance(a, comp_mod.TextPiece) and a.index == b.index:
        return comp_mod.TextPiece(a.index, a.text + b.text)
    return None


def coalesced(events, interval: float = STREAM_INTERVAL_S, clock=time.monotonic):
    """The turn's events with consecutive text (or thinking, or one choice's) pieces merged until
    `interval` has passed since the last one went out. Each piece sent costs a wake-up of the
    event loop, a socket write and the client's parsing, which on a small machine take CPU from
    llama.cpp's threads (measured on 2 cores: a piece every 20 ms cost 4.5% of the decode rate,
    every 50 ms nothing measurable). The first piece goes at once, so the time to first token is
    unchanged, and nothing is held past the next event, the end or an error. (A piece is held
    until the next event comes: the engine yields one per token, so that is a token's time,
    except while a stop sequence is held back.) `interval` 0 sends every piece as it comes."""
    from ..turn import TextDelta, ThinkingDelta

    texts = (TextDelta, ThinkingDelta, comp_mod.TextPiece)
    pending, last = None, None
    try:
        for ev in events:
            if not isinstance(ev, texts):
                if pending is not None:
                    yield pending
                    pending = None
                yield ev
                continue
            if pending is not None:
                merged = _joined(pending, ev)
                if merged is None:
                    yield pending
                pending = ev if merged is None else merged
            else:
                pending = ev
            now = clock()
            if last is None or now - last >= interval:
                yield pending
                pending, last = None, now
    except Exception:
        if pending is not None:  # what was written goes out before the error does
            yield pending
        raise
    if pending is not None:
        yield pending


def _finals(events):
    """Only the events a non-streamed answer is built from."""
    from ..turn import Done

    for ev in events:
        if isinstance(ev, (Done, comp_mod.ChoiceDone)):
            yield ev


async def _rest_or_gone(started, request):
    try:
        return await rest(started, request)
    except ClientGone:
        return None


async def _sse(started, opening: str | None, for_event):
    """The SSE events of a started job: its chunks, then `[DONE]`. A client that goes away
    cancels the generation (sse-starlette cancels this generator; `finally` sets the event)."""
    job = started.job
    try:
        if opening is not None:
            yield {"data": opening}
        if started.first is not None:
            for c in for_event(started.first):
                yield {"data": c}
        if not started.ended:
            try:
                async for ev in job.events():
                    for c in for_event(ev):
                        yield {"data": c}
            except Exception as exc:  # after the 200: the error goes out as an event
                err = from_exception(exc)
                yield {"data": json.dumps(err.body())}
                return
        yield {"data": "[DONE]"}
    finally:
        job.cancel.set()
