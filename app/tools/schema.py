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
and Optional[...] (which makes the parameter not required). A required `str`
parameter gets `minLength: 1`, so the grammar cannot produce an empty one.

A string parameter may also carry a pattern, enforced twice: by the grammar the
model samples under (llama.cpp's json-schema-to-grammar turns it into GBNF) and by
jsonschema when the call is executed, so a call that did not come through the
grammar (a native template, a remote endpoint, a script) is refused too:

    >>> from typing import Annotated
    >>> def lookup(code: Annotated[str, Pattern(r"^[A-Z]{3}[0-9]+$")]) -> str:
    ...     "Look up an order by its code."
    ...     return code
    >>> tool(lookup).parameters["properties"]["code"]
    {'type': 'string', 'minLength': 1, 'pattern': '^[A-Z]{3}[0-9]+$'}

`Pattern` documents the regular-expression dialect both sides read the same way.
A number parameter may carry bounds, `Annotated[int, Range(1, 10)]`: checked on every call,
and a small int range is an enum the grammar holds to.
"""
from __future__ import annotations

import copy
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

_JSON = {str: "string", int: "integer", float: "number", bool: "boolean"}


class SchemaError(TypeError):
    """A function cannot be described as a tool; the message names the parameter."""


@dataclass(frozen=True)
class Pattern:
    """A regular expression a whole string argument must match: `Annotated[str, Pattern(r"^...$")]`.

    The dialect is the part of regular expressions that Python's `re` (on execution)
    and llama.cpp's json-schema-to-grammar (in the grammar) read the same way:
    anchored `^...$`; literal letters, digits and punctuation; classes `[a-z0-9_]`;
    groups `(...)`; `|`; and `*`, `+`, `?`, `{m}`, `{m,n}`. Refused, because the
    converter would read them differently or emit GBNF llama.cpp rejects:
    backslashes (write `[.]`, `[+*]`, `[(]` for a literal metacharacter), `.`,
    negated classes `[^...]`, `(?...)` groups, and double quotes (the grammar writes
    the matched characters raw inside a JSON string). Keep it unambiguous (each
    string splits into the repeated parts one way only): jsonschema runs it with
    `re`, which backtracks.
    """

    regex: str

    def __post_init__(self) -> None:
        r = self.regex
        if not (isinstance(r, str) and len(r) >= 2 and r.startswith("^") and r.endswith("$")):
            raise SchemaError(f"pattern {r!r}: must be anchored, ^...$")
        in_class = False
        for i in range(1, len(r) - 1):
            c, bad = r[i], None
            if c == "\\":
                bad = "backslash escapes (put the character in a class, e.g. [.])"
            elif c == '"':
                bad = "double quotes"
            elif in_class:
                in_class = c != "]"
                if c == "[":
                    bad = "'[' inside a class"
            elif c == "[":
                in_class = True
                if r[i + 1] in "^]":
                    bad = "negated or empty classes"
            elif c == ".":
                bad = "'.' outside a class (write [.] for a dot)"
            elif c in "^$":
                bad = f"{c!r} other than at the ends"
            elif c == "(" and r[i + 1] == "?":
                bad = "(?...) groups"
            if bad:
                raise SchemaError(f"pattern {r!r}: {bad} are not supported (at {i})")
        if in_class:
            raise SchemaError(f"pattern {r!r}: unclosed '['")
        try:
            re.compile(r)
        except re.error as exc:
            raise SchemaError(f"pattern {r!r}: {exc}") from None


RANGE_ENUM = 64  # an int range with at most this many values is an enum in the grammar


@dataclass(frozen=True)
class Range:
    """Bounds of a number argument, both included: `Annotated[int, Range(1, 10)]`. Checked on
    every call (jsonschema's minimum/maximum); an int range of at most RANGE_ENUM values is also
    an enum, so the grammar can only write a value inside it (llama-cpp-python's converter
    ignores minimum and maximum)."""

    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.low is None and self.high is None:
            raise SchemaError("Range: give a low bound, a high bound or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise SchemaError(f"Range({self.low}, {self.high}): the low bound is above the high one")

    def apply(self, schema: dict, where: str) -> dict:
        if schema.get("type") not in ("integer", "number"):
            raise SchemaError(f"{where}: a Range applies to int and float only")
        out = dict(schema, **({"minimum": self.low} if self.low is not None else {}),
                   **({"maximum": self.high} if self.high is not None else {}))
        if (schema["type"] == "integer" and self.low is not None and self.high is not None
                and self.high - self.low < RANGE_ENUM):
            out["enum"] = list(range(int(math.ceil(self.low)), int(math.floor(self.high)) + 1))
        return out


@dataclass
class Tool:
    """A callable the model may request, with what the model is told about it.

    side_effects: False for read-only tools (they may default to `allow`);
    True for anything that changes the world (always at least `ask` when the
    request could have been injected by documents or tool output).
    private: a read-only tool that reads the user's own files: allowed by default,
    but asked about once the turn has seen documents or tool output, so an
    injected "read ~/.ssh/id_rsa" never runs unseen (an explicit allow rule still wins).
    answers: the result IS the answer (a calculator, a clock): after an ok call the loop's
    answer states it (the answer grammar begins with it), and a reply that does not is flagged.
    It may also be a function of the call's arguments and the user's message, for a tool whose
    result answers some messages only (read_file answers "Read notes.txt", not "Summarise my
    notes"); see `answers_call`.
    choices: parameter name -> a function listing the values that exist now (the files under
    the tool roots); each turn's grammar limits that parameter to them (see `narrowed`).
    """

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]
    side_effects: bool = True
    meta: dict = field(default_factory=dict)
    private: bool = False
    answers: bool | Callable[[dict, str], bool] = False
    choices: dict[str, Callable[[], list[str] | None]] = field(default_factory=dict)

    def narrowed(self) -> "Tool | None":
        """This tool with each `choices` parameter an enum of what its listing returns now, for one
        turn's grammar; None when a listing is empty (a read_file with no file to read is left out
        of the turn). A listing that gives None (over its cap, unreadable) leaves the parameter as
        declared. Execution still validates against the declared `parameters` and the tool's own
        checks: the enum is a grammar aid, not a guard."""
        if not self.choices:
            return self
        params = copy.deepcopy(self.parameters)
        for pname, listing in self.choices.items():
            try:
                names = listing()
            except OSError:
                names = None
            if names == []:
                return None
            if names and pname in params.get("properties", {}):
                prop = params["properties"][pname]
                params["properties"][pname] = {"type": "string", "enum": list(names),
                                               **({"description": prop["description"]} if "description" in prop else {})}
        return replace(self, parameters=params)

    def answers_call(self, args: dict, message: str) -> bool:
        """Whether this call's result is, by itself, the answer to the user's `message`."""
        if callable(self.answers):
            try:
                return bool(self.answers(args, message))
            except Exception:  # a third-party predicate that breaks only loses the shortcut
                return False
        return bool(self.answers)

    def spec(self) -> dict:
        """OpenAI-style function spec, as chat templates with tool support expect."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _type_schema(annotation, where: str) -> tuple[dict, bool]:
    """(JSON schema, optional?) for one annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        schema, optional = _type_schema(args[0], where)
        patterns = [m for m in args[1:] if isinstance(m, Pattern)]
        ranges = [m for m in args[1:] if isinstance(m, Range)]
        if len(patterns) > 1 or len(ranges) > 1:
            raise SchemaError(f"{where}: one Pattern or Range per parameter")
        if ranges:
            schema = ranges[0].apply(schema, where)
        if patterns:
            if schema.get("type") != "string":
                raise SchemaError(f"{where}: a Pattern applies to str only")
            schema["pattern"] = patterns[0].regex
        return schema, optional
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


def tool(fn: Callable, name: str | None = None, side_effects: bool = True, private: bool = False,
         answers: bool | Callable[[dict, str], bool] = False,
         choices: dict[str, Callable[[], list[str] | None]] | None = None) -> Tool:
    """Describe `fn` as a Tool; every parameter needs a supported annotation. `answers`,
    `choices`: see Tool (each name in `choices` must be a str parameter)."""
    name = name or fn.__name__
    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]{0,63}", name):
        raise SchemaError(f"tool name {name!r}: use letters, digits and _ only")
    description, arg_docs = _docstring_parts(fn.__doc__ or "")
    if not description:
        raise SchemaError(f"tool {name!r}: needs a docstring saying what it does")
    hints = typing.get_type_hints(fn, include_extras=True)
    properties, required, defaults = {}, [], {}
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise SchemaError(f"tool {name!r}: *args/**kwargs cannot be described")
        if pname not in hints:
            raise SchemaError(f"tool {name!r}: parameter {pname!r} has no type annotation")
        where = f"tool {name!r} parameter {pname!r}"
        schema, optional = _type_schema(hints[pname], where)
        if param.default is inspect.Parameter.empty and not optional:
            required.append(pname)
            if schema.get("type") == "string":
                # The grammar converter honours minLength only where there is no pattern;
                # with one, the pattern itself must refuse "" (checked here). jsonschema checks both.
                schema = {"type": "string", "minLength": 1, **schema}
                if "pattern" in schema and re.fullmatch(schema["pattern"], ""):
                    raise SchemaError(f"{where}: required, but its pattern accepts an empty string (use + rather than *)")
        if pname in arg_docs:
            schema["description"] = arg_docs[pname]
        if param.default is not inspect.Parameter.empty and param.default is not None:
            defaults[pname] = param.default
        properties[pname] = schema
    for pname in choices or {}:
        if properties.get(pname, {}).get("type") != "string":
            raise SchemaError(f"tool {name!r} choices {pname!r}: not a str parameter")
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return Tool(name, description, parameters, fn, side_effects, meta={"defaults": defaults}, private=private,
                answers=answers, choices=dict(choices or {}))
