"""The user's own prompt suite: prompts with checks, run through the chat's turn, answers kept.

A suite is YAML (every error names the file and line)::

    name: smoke                 # optional (the file stem); system, tools, collections: defaults
    system: You are terse.
    prompts:
      - id: capital             # optional; p1, p2, ... by position otherwise
        prompt: What is the capital of France?
        checks:
          - contains: Paris     # or a list (all must appear); ignore_case: true by default
          - not_contains: [London, Berlin]
          - regex: '\\bParis\\b' # re.search
          - exact: Paris        # the whole answer, after strip()
          - json_schema: {type: object, required: [city]}   # the answer (or its ```json block)
          - judge: Is the answer polite?                     # a judge model answers yes/no

Text is taken as written (`contains: yes` is "yes", not a boolean); an empty value, `~` or
`null` is refused. The turn and the judge are callables, so nothing here needs `app`:
``run_suite(load_suite("s.yaml"), answer=turn, judge=judge).rows("my-model")``.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jsonschema
import yaml
from jsonschema.validators import validator_for
from referencing.exceptions import Unresolvable

from models.atomic import atomic_path

from .rows import EvalError, Row, mean_stderr, read_input

CHECK_KINDS = ("contains", "not_contains", "regex", "exact", "json_schema", "judge")
SUITE_KEYS = ("name", "system", "tools", "collections", "prompts")
ITEM_KEYS = ("id", "prompt", "system", "tools", "collections", "checks")
EXTRA_KEYS = {"contains": ("ignore_case",), "not_contains": ("ignore_case",)}
MAX_SUITE_BYTES = 10 * 1024 * 1024
_NULL = "tag:yaml.org,2002:null"
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Check:
    """One check of an answer. `value`: tuple of str (contains, not_contains), str (regex, exact,
    judge) or the schema dict (json_schema). `line` is 1-based, in the suite file."""

    kind: str
    value: object
    line: int
    ignore_case: bool = True


@dataclass(frozen=True)
class Item:
    """One prompt, with the suite's defaults already applied; what `answer(item)` receives."""

    id: str
    prompt: str
    system: str | None
    tools: bool
    collections: tuple[str, ...]
    checks: tuple[Check, ...]
    line: int


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    items: tuple[Item, ...]


@dataclass(frozen=True)
class CheckResult:
    kind: str
    passed: bool
    reason: str  # short, e.g. "regex '\\d+' not found"
    line: int


@dataclass(frozen=True)
class ItemResult:
    item: Item
    answer: str
    checks: tuple[CheckResult, ...]
    seconds: float  # time the answer took (reported, never compared)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        it = self.item
        return {"id": it.id, "line": it.line, "prompt": it.prompt, "system": it.system, "tools": it.tools,
                "collections": list(it.collections), "answer": self.answer, "passed": self.passed,
                "seconds": round(self.seconds, 3), "checks": [asdict(c) for c in self.checks]}


def binomial_stderr(passed: int, n: int) -> float | None:
    """Sample standard error of a pass rate, sqrt(p(1-p)/(n-1)); None when n < 2."""
    return mean_stderr([1.0] * passed + [0.0] * (n - passed))


@dataclass
class SuiteResult:
    suite: Suite
    items: list[ItemResult] = field(default_factory=list)

    def rows(self, model: str) -> list[Row]:
        """`pass_rate` over items (an item passes when all its checks do), then `pass_rate:<kind>`
        over all checks of each kind present. Checks of one item are not independent, so the
        per-kind standard errors are a rough guide."""
        def row(metric: str, outcomes: list[bool]) -> Row:
            n, good = len(outcomes), sum(outcomes)
            return Row(model, "prompts", self.suite.name, metric, good / n if n else 0.0, binomial_stderr(good, n), n)

        out = [row("pass_rate", [r.passed for r in self.items])]
        for kind in CHECK_KINDS:
            if outcomes := [c.passed for r in self.items for c in r.checks if c.kind == kind]:
                out.append(row(f"pass_rate:{kind}", outcomes))
        return out

    def write_answers(self, path: str | Path, model: str | None = None) -> Path:
        """Every answer and its check outcomes, one JSON object per line, written atomically
        (the file appears complete or not at all). `model`, if given, is added to each line."""
        head = {"suite": self.suite.name, **({"model": model} if model is not None else {})}
        text = "".join(json.dumps({**head, **r.as_dict()}, ensure_ascii=False) + "\n" for r in self.items)
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return Path(path)


# -- loading ---------------------------------------------------------------------------

def _error(path: Path, at, place: str, msg: str) -> EvalError:
    """`file:line: place: message`; `at` is a 1-based line or a YAML node (its own line)."""
    line = at if isinstance(at, int) else at.start_mark.line + 1
    return EvalError(f"{path}:{line}: {place + ': ' if place else ''}{msg}")


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file; raises EvalError naming the file and line."""
    path = w = Path(path)
    text = read_input(path, "suite", MAX_SUITE_BYTES)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise _error(w, line, "", f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:  # ReaderError (control characters) has a character position
        pos = getattr(exc, "position", 0) or 0
        raise _error(w, text[:pos].count("\n") + 1, "", f"invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise _error(w, 1, "", "invalid YAML: nested too deeply") from None
    if not isinstance(root, yaml.MappingNode):  # None: an empty file
        raise _error(w, root or 1, "", "the suite must be a mapping with 'prompts'")
    top = _mapping(w, root, "", SUITE_KEYS)
    name = _field(w, top, "name", _text, "", path.stem)
    defaults = {k: _field(w, top, k, conv, "", d) for k, conv, d in _DEFAULTS}
    if "prompts" not in top:
        raise _error(w, root, "", "'prompts' is missing: the suite needs a list of prompts")
    prompts = top["prompts"][1]
    if not isinstance(prompts, yaml.SequenceNode) or not prompts.value:
        raise _error(w, prompts, "prompts", "must be a non-empty list of prompts")
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for i, node in enumerate(prompts.value):
        item = _item(w, node, i, defaults)
        if item.id in first_line:
            raise _error(w, item.line, f"prompts[{i}]", f"duplicate id {item.id!r} (first at line {first_line[item.id]})")
        first_line[item.id] = item.line
        items.append(item)
    return Suite(name, path, tuple(items))


def _mapping(w: Path, node: yaml.MappingNode, place: str, allowed) -> dict:
    """{key: (key node, value node)}; unknown and repeated keys are errors."""
    out: dict = {}
    for k, v in node.value:
        key = k.value if isinstance(k, yaml.ScalarNode) else None
        if key not in allowed:
            shown = key if key is not None else "a non-text key"
            raise _error(w, k, place, f"unknown key {shown!r} (choose {', '.join(allowed)})")
        if key in out:
            raise _error(w, k, place, f"{key!r} appears twice")
        out[key] = (k, v)
    return out


def _field(w: Path, m: dict, key: str, conv, place: str, default):
    return conv(w, m[key][1], f"{place}.{key}" if place else key) if key in m else default


def _text(w: Path, node, place: str) -> str:
    # The scalar's own text, whatever YAML would resolve it to (`yes`, `8`); an empty value,
    # `~` or `null` is the usual slip (a key with nothing after it), so it is refused.
    if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL or not node.value.strip():
        raise _error(w, node, place, "must be a non-empty string")
    return node.value


def _texts(w: Path, node, place: str, single_ok: bool = False) -> tuple[str, ...]:
    if single_ok and isinstance(node, yaml.ScalarNode):
        return (_text(w, node, place),)
    if not isinstance(node, yaml.SequenceNode) or (single_ok and not node.value):
        raise _error(w, node, place, "must be a " + ("string or a non-empty " if single_ok else "") + "list of strings")
    return tuple(_text(w, v, f"{place}[{j}]") for j, v in enumerate(node.value))


def _bool(w: Path, node, place: str) -> bool:
    value = yaml.SafeLoader("").construct_document(node)  # typed: true/false/yes/no
    if not isinstance(value, bool):
        raise _error(w, node, place, "must be true or false")
    return value


_DEFAULTS = (("system", _text, None), ("tools", _bool, False), ("collections", _texts, ()))


def _item(w: Path, node, i: int, defaults: dict) -> Item:
    place = f"prompts[{i}]"
    if not isinstance(node, yaml.MappingNode):
        raise _error(w, node, place, "must be a mapping with 'prompt' and 'checks'")
    m = _mapping(w, node, place, ITEM_KEYS)
    for key in ("prompt", "checks"):
        if key not in m:
            raise _error(w, node, place, f"{key!r} is missing" + (": give at least one check" if key == "checks" else ""))
    prompt = _field(w, m, "prompt", _text, place, None)
    item_id = _field(w, m, "id", _text, place, f"p{i + 1}")
    opts = {k: _field(w, m, k, conv, place, defaults[k]) for k, conv, _d in _DEFAULTS}
    checks_node = m["checks"][1]
    if not isinstance(checks_node, yaml.SequenceNode) or not checks_node.value:
        raise _error(w, checks_node, f"{place}.checks", "must be a non-empty list of checks")
    checks = tuple(_check(w, c, f"{place}.checks[{j}]") for j, c in enumerate(checks_node.value))
    return Item(item_id, prompt, opts["system"], opts["tools"], opts["collections"], checks, node.start_mark.line + 1)


def _check(w: Path, node, place: str) -> Check:
    choices = f"(choose {', '.join(CHECK_KINDS)})"
    if not isinstance(node, yaml.MappingNode) or not node.value:
        raise _error(w, node, place, f"a check is a mapping such as 'contains: TEXT' {choices}")
    keys = [k for k, _v in node.value]
    names = [k.value if isinstance(k, yaml.ScalarNode) else None for k in keys]
    found = [j for j, name in enumerate(names) if name in CHECK_KINDS]
    if len(found) != 1:  # no kind (the first key that is not an option is the typo) or two
        j = found[1] if found else next((j for j, name in enumerate(names) if name != "ignore_case"), 0)
        raise _error(w, keys[j], place, "one check per list entry" if found else f"unknown check {names[j]!r} {choices}")
    key_node, kind = keys[found[0]], names[found[0]]
    m = _mapping(w, node, place, (kind, *EXTRA_KEYS.get(kind, ())))
    vnode, line = m[kind][1], key_node.start_mark.line + 1
    if kind in ("contains", "not_contains"):
        return Check(kind, _texts(w, vnode, f"{place}.{kind}", single_ok=True), line,
                     _field(w, m, "ignore_case", _bool, place, True))
    if kind == "json_schema":
        return Check(kind, _schema(w, vnode, place), line)
    pattern = _text(w, vnode, f"{place}.{kind}")
    if kind == "regex":
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _error(w, vnode, place, f"bad regex '{pattern}': {exc}") from None
    return Check(kind, pattern, line)


def _schema(w: Path, vnode, place: str) -> dict:
    if not isinstance(vnode, yaml.MappingNode):
        raise _error(w, vnode, f"{place}.json_schema", "must be a mapping (a JSON schema)")
    schema = yaml.SafeLoader("").construct_document(vnode)  # plain Python data
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise _error(w, vnode, f"{place}.json_schema", f"not JSON data ({exc})") from None
    try:
        validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        at = _node_at(vnode, list(exc.path))
        raise _error(w, at, f"{place}.json_schema{'/' + where if where else ''}",
                      f"bad JSON schema: {exc.message}") from None
    return schema


def _node_at(node, path: list):
    """The YAML node at a JSON path inside `node` (the deepest one found), for its line."""
    for part in path:
        if isinstance(node, yaml.MappingNode):
            children = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
            part = str(part)
        elif isinstance(node, yaml.SequenceNode):
            children = dict(enumerate(node.value))
        else:
            break
        if part not in children:
            break
        node = children[part]
    return node


# -- running ---------------------------------------------------------------------------

Answer = Callable[[Item], str]
Judge = Callable[[str, str, str], bool]


def run_suite(suite: Suite, answer: Answer, judge: Judge | None = None,
              on_item: Callable[[int, int, ItemResult], None] | None = None) -> SuiteResult:
    """Answer every item with `answer(item)` and check it; `judge(question, prompt, answer)` decides
    judge checks. `on_item(i, n, result)` follows each item (i counts from 1). A suite with judge
    checks and no judge is refused before any answer is generated."""
    needs = [(item, c) for item in suite.items for c in item.checks if c.kind == "judge"]
    if judge is None and needs:
        item, c = needs[0]
        raise EvalError(f"{suite.path}:{c.line}: prompt {item.id!r} has a judge check but no judge model was given")
    result = SuiteResult(suite)
    for i, item in enumerate(suite.items, 1):
        t0 = time.perf_counter()
        text = answer(item)
        seconds = time.perf_counter() - t0
        if not isinstance(text, str):
            raise TypeError(f"answer() returned {type(text).__name__}, expected str")
        checks = tuple(CheckResult(c.kind, *_verdict(suite, item, c, text, judge), c.line) for c in item.checks)
        result.items.append(r := ItemResult(item, text, checks, seconds))
        if on_item is not None:
            on_item(i, len(suite.items), r)
    return result


def _short(s: str, n: int = 60) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def _verdict(suite: Suite, item: Item, c: Check, answer: str, judge: Judge | None) -> tuple[bool, str]:
    if c.kind in ("contains", "not_contains"):
        hay = answer.casefold() if c.ignore_case else answer
        present = [t for t in c.value if (t.casefold() if c.ignore_case else t) in hay]
        if c.kind == "contains":
            missing = [t for t in c.value if t not in present]
            return (not missing, f"missing {', '.join(map(_short, missing))}" if missing
                    else f"contains {', '.join(map(_short, c.value))}")
        return (not present, f"contains {', '.join(map(_short, present))}" if present
                else f"contains none of {', '.join(map(_short, c.value))}")
    if c.kind == "regex":
        m = re.search(c.value, answer)
        return (m is not None, f"regex '{c.value}' matched {_short(m.group(0))}" if m
                else f"regex '{c.value}' not found")
    if c.kind == "exact":
        got, want = answer.strip(), c.value.strip()
        return got == want, "exact match" if got == want else f"expected {_short(want)}, got {_short(got)}"
    if c.kind == "json_schema":
        return _json_verdict(suite, c, answer)
    verdict = judge(c.value, item.prompt, answer)
    if not isinstance(verdict, bool):
        raise TypeError(f"judge() returned {type(verdict).__name__}, expected bool")
    return verdict, f"judge said {'yes' if verdict else 'no'} to {_short(c.value)}"


def json_text(answer: str) -> str:
    """The JSON part of an answer: the first ```json (or bare ```) fenced block, else all of it."""
    m = _FENCE.search(answer)
    return (m.group(1) if m else answer).strip()


def _json_verdict(suite: Suite, c: Check, answer: str) -> tuple[bool, str]:
    try:
        doc = json.loads(json_text(answer))
    except ValueError as exc:
        return False, f"not JSON ({exc})"
    cls = validator_for(c.value)
    try:
        err = jsonschema.exceptions.best_match(cls(c.value, format_checker=cls.FORMAT_CHECKER).iter_errors(doc))
    except Unresolvable as exc:  # a $ref to nowhere (nothing is fetched): the suite's fault, not the answer's
        raise EvalError(f"{suite.path}:{c.line}: json_schema cannot be applied: {exc}") from None
    if err is None:
        return True, "valid JSON for the schema"
    at = "/".join(str(p) for p in err.absolute_path)
    return False, f"schema: {err.message}{' at /' + at if at else ''}"
