"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers, from a malformed body to a model that will not load,
goes out in this shape, so OpenAI clients raise their own typed errors with our message.
"""
from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A request the server refuses or could not serve; `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_exception(exc: BaseException) -> ApiError:
    """The ApiError for an exception raised while serving: the errors whose message is written
    for the user (a prompt over the window, a collection that does not exist) are the client's
    (400); anything else is ours (500, its type named)."""
    from ..budget import ContextOverflow
    from ..engine import EngineError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflow):
        return ApiError(400, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, EngineError) and "context window" in str(exc):
        return ApiError(400, str(exc), "prompt", "context_length_exceeded")
    try:
        from rag.store import RagError
    except ImportError:  # pragma: no cover
        RagError = ()
    if RagError and isinstance(exc, RagError):
        return ApiError(400, str(exc), "crofter.collections")
    if isinstance(exc, EngineError):
        return ApiError(500, str(exc), code="engine_error")
    return ApiError(500, f"{type(exc).__name__}: {exc}", code="internal_error")
