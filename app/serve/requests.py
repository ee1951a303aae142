"""The request bodies, validated with pydantic; a bad one is a 400 naming the field.

Bodies are read with a cap (413 past `body_limit`, checked on Content-Length and again on
the bytes received), parsed as JSON (400 "not valid JSON ... at character N"), then
validated. Fields OpenAI defines that crofter does not use (user, metadata, logit_bias...)
are accepted and ignored, as clients send them routinely; `n` other than 1 is refused.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ApiError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None


class FunctionSpec(_Body):
    name: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$")
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolSpec(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StreamOptions(_Body):
    include_usage: bool = False


class CrofterExtension(_Body):
    """crofter's own request field: `{"crofter": {"collections": ["notes"]}}` answers over
    the user's document collections and returns the sources in the response's `crofter`;
    `{"crofter": {"tools": ["calculator"]}}` lets the model call crofter's own tools, run by
    the server, and returns the calls in the response's `crofter.calls`."""

    collections: list[str] = Field(default_factory=list, max_length=16)
    k: Optional[int] = Field(default=None, ge=1, le=100)
    tools: list[str] = Field(default_factory=list, max_length=64)
    """crofter's own tools the server runs for this turn (calculator, read_file, MCP tools...),
    decided by its policy: read-only ones run, others only if `crofter serve --allow-tool`
    names them (no one is there to ask, so a call that needs asking is denied)."""


class _Sampled(_Body):
    model: str = Field(min_length=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repeat_penalty: Optional[float] = Field(default=None, ge=0, le=10)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    seed: Optional[int] = Field(default=None, ge=-1, le=2**32 - 1)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16:
            raise ApiError(400, f"stop: at most 16 sequences, got {len(stop)}", "stop")
        return [s for s in stop if s]


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[list[ToolSpec]] = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: Optional[bool] = None  # one call per response either way
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    crofter: Optional[CrofterExtension] = None
    grammar: Optional[str] = Field(default=None, min_length=1, max_length=100_000)
    """A llama.cpp GBNF grammar for the reply (llama-server's extension field; crofter's remote engine sends it)."""


class CompletionRequest(_Sampled):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(default=16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    suffix: Optional[str] = None


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, ge=1)


async def read_json(request, limit: int) -> Any:
    """The request's JSON body, at most `limit` bytes. It must say it is JSON: a browser sends
    a cross-site POST without asking first only for form and text types, so this keeps web
    pages from driving a server on this machine (a 415 otherwise)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(415, f"Content-Type {kind or '(none)'!r}: send the body as application/json "
                       "(curl: -H 'Content-Type: application/json')", "Content-Type", "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; the most this server accepts is {limit}",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server accepts",
                           code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc.msg} at character {exc.pos})") from None


def parse(model: type[BaseModel], obj: Any) -> BaseModel:
    """`obj` as `model`, or a 400 naming the first bad field, e.g. "messages.0.role: ..."."""
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, not a JSON {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", where or None) from None


def _is_union_tag(part) -> bool:
    """pydantic names the union branch it tried in `loc` (e.g. 'str', 'list[dict]'): not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "dict", "function-after", "literal['none','auto','required']"))
