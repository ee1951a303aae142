"""Rendering an untrusted chat template: sandboxed, and capped in size, time and output.

A GGUF's chat template is code from whoever made the file. jinja2's
ImmutableSandboxedEnvironment stops it reaching Python's internals (``__mro__``,
``__subclasses__``, ``__globals__``), but not from using the machine: nested loops
over ``range(100000)`` run for hours, ``'x' * 10**10`` or ``'x'|center(10**10)``
allocate gigabytes. So, on top of the sandbox:

- the template source is capped at MAX_TEMPLATE_BYTES (real ones are a few KiB);
- ``*``, ``**``, ``+`` and ``%`` are intercepted and refuse results over MAX_OUTPUT_CHARS,
  and a filter given a number over MAX_OUTPUT_CHARS (a width, a count) is refused;
- each render runs on its own thread with a deadline of RENDER_TIMEOUT_S; a render still
  running then is stopped by raising TemplateTimeout inside it (CPython's async exception,
  delivered between two bytecodes, so a pure-Python loop stops within microseconds).

The variables a template sees are those of Hugging Face's chat templates (and
llama-cpp-python's Jinja2ChatFormatter): messages, tools, bos_token, eos_token,
add_generation_prompt, raise_exception, strftime_now; ``tojson`` renders like theirs.
"""
from __future__ import annotations

import ctypes
import json
import re
import threading
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_BYTES = 256 * 1024
MAX_OUTPUT_CHARS = 4 * 1024 * 1024
RENDER_TIMEOUT_S = 2.0
_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\d{7,}|\*)")  # "%0999999999d": a width that allocates gigabytes


class TemplateTimeout(Exception):
    """A template render ran past RENDER_TIMEOUT_S and was stopped."""


def _size(x) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple)) else None


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError(f"exponent {right} is too large")
        if operator == "*":
            size, times = (_size(left), right) if _size(left) is not None else (_size(right), left)
            if size is not None and isinstance(times, int) and size * times > MAX_OUTPUT_CHARS:
                raise SecurityError(f"repeating {size} items {times} times is over the output cap")
        if operator == "+" and (_size(left) or 0) + (_size(right) or 0) > MAX_OUTPUT_CHARS:
            raise SecurityError("concatenation over the output cap")
        if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise SecurityError("a format width over the output cap")
        return super().call_binop(context, operator, left, right)


def _capped(name: str, fn):
    def filter_(*args, **kwargs):
        for v in (*args[1:], *kwargs.values()):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > MAX_OUTPUT_CHARS:
                raise SecurityError(f"filter {name!r} given {v}, over the output cap")
        if name == "format" and args and isinstance(args[0], str) and _WIDE_FORMAT.search(args[0]):
            raise SecurityError("a format width over the output cap")
        return fn(*args, **kwargs)

    for attr in ("jinja_pass_arg",):  # keep @pass_context / @pass_environment filters working
        if hasattr(fn, attr):
            setattr(filter_, attr, getattr(fn, attr))
    return filter_


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _IgnoreGeneration(jinja2.ext.Extension):
    """Hugging Face's ``{% generation %}`` tag (marks assistant spans for training): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise ValueError(message)


class GuardedTemplate:
    """A chat template compiled in the guarded sandbox; raises ValueError if it is too big
    or does not compile.

    >>> t = GuardedTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    >>> t.render(messages=[{"role": "user", "content": "hi"}])
    '<user>hi'
    """

    def __init__(self, source: str):
        if len(source.encode("utf-8", "replace")) > MAX_TEMPLATE_BYTES:
            raise ValueError(f"the template is {len(source.encode('utf-8', 'replace'))} bytes, "
                             f"over the {MAX_TEMPLATE_BYTES // 1024} KiB cap")
        env = _GuardedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                  extensions=[_IgnoreGeneration, jinja2.ext.loopcontrols])
        env.filters = {name: _capped(name, fn) for name, fn in env.filters.items()}
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)

    def render(self, timeout: float = RENDER_TIMEOUT_S, **variables) -> str:
        """Render with the chat-template variables plus `variables`; TemplateTimeout past `timeout`."""
        variables = {"raise_exception": _raise_exception,
                     "strftime_now": lambda f: datetime.now().strftime(f), **variables}
        box: dict = {}

        def run() -> None:
            try:
                box["out"] = self._template.render(**variables)
            except BaseException as exc:  # handed to the caller's thread
                box["err"] = exc

        worker = threading.Thread(target=run, name="crofter-template", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(TemplateTimeout))
            worker.join(1.0)
            raise TemplateTimeout(f"the template took more than {timeout:g} s to render and was stopped")
        if "err" in box:
            raise box["err"]
        out = box["out"]
        if len(out) > MAX_OUTPUT_CHARS:
            raise SecurityError(f"the template rendered {len(out)} characters, over the output cap")
        return out
