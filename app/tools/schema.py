"""A tool from a typed Python function: name, description and JSON schema.

    >>> def add(a: int, b: int = 2) -> int:
    ...     '''Add two numbers.
    ...
    ...     Args:
    ...         a: the first number
    ...         b: the second number
    ...     '''
    ...     return a + b
    >>> tool(add).parameters["properties"]["a"]
    {'type': 'integer', 'description': 'the first number'}

Supported annotations: str, int, float, bool, list[...] of those, Literal[...],
and Optional[...] (which makes the parameter not required).
"""
from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

_JSON = {str: "string", int: "integer", float: "number", bool: "boolean"}


class SchemaError(TypeError):
    """A function cannot be described as a tool; the message names the parameter."""


@dataclass
class Tool:
    """A callable the model may request, with what the model is told about it.

    side_effects: False for read-only tools (they may default to `allow`);
    True for anything that changes the world (always at least `ask` when the
    request could have been injected by documents or tool output).
    private: a read-only tool that reads the user's own files: allowed by default,
    but asked about once the turn has seen documents or tool output, so an
    injected "read ~/.ssh/id_rsa" never runs unseen (an explicit allow rule still wins).
    """

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]
    side_effects: bool = True
    meta: dict = field(default_factory=dict)
    private: bool = False

    def spec(self) -> dict:
        """OpenAI-style function spec, as chat templates with tool support expect."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _type_schema(annotation, where: str) -> tuple[dict, bool]:
    """(JSON schema, optional?) for one annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise SchemaError(f"{where}: only Optional[X] unions are supported")
        return _type_schema(rest[0], where)[0], True
    if origin is Literal:
        return {"enum": list(args)}, False
    if origin in (list, typing.List):
        item = _type_schema(args[0], where)[0] if args else {}
        return {"type": "array", "items": item}, False
    if annotation in _JSON:
        return {"type": _JSON[annotation]}, False
    raise SchemaError(f"{where}: unsupported annotation {annotation!r} (use str, int, float, bool, list, Literal)")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """Description (text before 'Args:') and per-argument descriptions."""
    doc = inspect.cleandoc(doc or "")
    head, _, args = doc.partition("\nArgs:")
    descriptions = {}
    for m in re.finditer(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+?)(?=^\s+\w+(?:\s*\([^)]*\))?:|\Z)", args, re.M | re.S):
        descriptions[m.group(1)] = " ".join(m.group(2).split())
    return " ".join(head.split()), descriptions


def tool(fn: Callable, name: str | None = None, side_effects: bool = True, private: bool = False) -> Tool:
    """Describe `fn` as a Tool; every parameter needs a supported annotation."""
    name = name or fn.__name__
    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]{0,63}", name):
        raise SchemaError(f"tool name {name!r}: use letters, digits and _ only")
    description, arg_docs = _docstring_parts(fn.__doc__ or "")
    if not description:
        raise SchemaError(f"tool {name!r}: needs a docstring saying what it does")
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise SchemaError(f"tool {name!r}: *args/**kwargs cannot be described")
        if pname not in hints:
            raise SchemaError(f"tool {name!r}: parameter {pname!r} has no type annotation")
        schema, optional = _type_schema(hints[pname], f"tool {name!r} parameter {pname!r}")
        if pname in arg_docs:
            schema["description"] = arg_docs[pname]
        properties[pname] = schema
        if param.default is inspect.Parameter.empty and not optional:
            required.append(pname)
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return Tool(name, description, parameters, fn, side_effects, private=private)
