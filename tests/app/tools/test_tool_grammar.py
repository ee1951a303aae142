"""Tool arguments in the grammar: required strings are never empty, patterns hold.

A user saw the bundled 135M model call the calculator with {"expression": ""} twice (issue #12).
These tests sample the real model at a high temperature under the calculator's branch of the
tool-step grammar (`calling.call_schema`, exactly what `output_schema` puts in the oneOf), so
every sample is a calculator call and every one is checked.
"""
from __future__ import annotations

import json
import re
from typing import Annotated

import jsonschema
import pytest
import regex  # a dependency of transformers; partial matching checks a sample cut off by max_tokens
from llama_cpp import LlamaGrammar
from llama_cpp.llama_grammar import json_schema_to_gbnf

from app.engine import Sampling
from app.session import ChatSession
from app.tools.calc import PATTERN
from app.tools.calling import ToolLoop, call_schema, output_schema
from app.tools.policy import Policy
from app.tools.registry import ToolContext, ToolRegistry
from app.tools.schema import Range, tool

PROMPT = "What is 1234 * 5678? Use the calculator tool."


def _rule(gbnf: str, suffix: str) -> str:
    (body,) = [line.split(" ::= ", 1)[1] for line in gbnf.splitlines() if line.split(" ::= ")[0].endswith(suffix)]
    return body


def test_required_strings_cannot_be_empty_in_the_grammar(tmp_path):
    """llama-cpp-python's json-schema-to-grammar honours minLength (without a pattern) and the pattern."""
    reg = ToolRegistry.discover(ToolContext(roots=[str(tmp_path)]))
    gbnf = json_schema_to_gbnf(json.dumps(output_schema(list(reg.tools.values()))))
    read_path = _rule(gbnf, f"-{list(reg.tools).index('read_file')}-arguments-path")
    assert read_path == '"\\"" char+ "\\"" space'  # at least one character
    timezone = _rule(gbnf, "-arguments-timezone-kv")
    assert timezone.endswith(" string")  # optional: may be empty (string ::= "\"" char* "\"")
    expression = _rule(gbnf, "-arguments-expression")
    assert "char" not in expression and expression.startswith('"\\"" [-+*/%(), ]* ([0-9] |')  # never a leading "."


def _sample(engine, reg, name: str, seeds, max_tokens: int = 64):
    """One constrained generation per seed under `name`'s call branch: [(obj or None, raw, finish)]."""
    grammar = LlamaGrammar.from_json_schema(json.dumps(call_schema(reg.tools[name])), verbose=False)
    out = []
    for seed in seeds:
        session = ChatSession(engine, Sampling(temperature=1.5, seed=seed, max_tokens=max_tokens))
        loop = ToolLoop(session, reg, Policy(), approve=lambda *a: False)
        out.append(loop.decide(session.messages + [{"role": "user", "content": PROMPT}], grammar))
    return out


def _check_calculator(samples, params) -> int:
    checked = 0
    for obj, raw, finish in samples:
        if finish == "stop":
            assert obj is not None and obj["tool"] == "calculator", raw  # a finished sample parses
            expr = obj["arguments"]["expression"]
            assert expr != "" and re.fullmatch(PATTERN, expr), raw
            jsonschema.validate(obj["arguments"], params)  # what the grammar lets through, execution accepts
        else:  # cut off by max_tokens: what was written of the expression is a prefix the pattern allows
            assert finish == "length", raw
            m = re.search(r'"expression"\s*:\s*"([^"]*)$', raw)
            assert m is None or regex.fullmatch(PATTERN, m.group(1), partial=True), raw
        checked += 1
    return checked


def _check_paths(samples) -> int:
    checked = 0
    for obj, raw, finish in samples:
        if finish == "stop":
            assert obj is not None and obj["tool"] == "read_file" and obj["arguments"]["path"] != "", raw
        else:
            assert finish == "length" and not re.search(r'"path"\s*:\s*""', raw), raw
        checked += 1
    return checked


def test_sampled_calculator_calls_are_never_empty_and_match(engine, tmp_path):
    reg = ToolRegistry.discover(ToolContext(roots=[str(tmp_path)]))
    seeds = range(3)
    assert _check_calculator(_sample(engine, reg, "calculator", seeds, 48), reg.tools["calculator"].parameters) == 3
    assert _check_paths(_sample(engine, reg, "read_file", range(2), 48)) == 2


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 2 minutes on an idle 2-core machine; grammar sampling slows badly under load
def test_sampled_calculator_calls_many_seeds(engine, tmp_path):
    reg = ToolRegistry.discover(ToolContext(roots=[str(tmp_path)]))
    samples = _sample(engine, reg, "calculator", range(100, 140))
    assert _check_calculator(samples, reg.tools["calculator"].parameters) == 40
    print(f"\ncalculator: 40 seeds at T=1.5, {sum(f == 'stop' for _, _, f in samples)} complete, "
          f"{sum(o is not None and o['arguments']['expression'] == '' for o, _, _ in samples)} empty")
    assert _check_paths(_sample(engine, reg, "read_file", range(100, 120))) == 20


def pick_page(page: Annotated[int, Range(1, 10)]) -> str:
    """Open one page of the user's notebook.

    Args:
        page: the page number
    """
    return str(page)


def test_sampled_ranged_ints_stay_inside_their_range(engine):
    """A required Range(1, 10) argument is an enum in the grammar, so even a hot sample can only
    write 1..10 (llama-cpp-python's converter would ignore minimum and maximum)."""
    reg = ToolRegistry()
    reg.register(tool(pick_page, side_effects=False), "test")
    assert reg.tools["pick_page"].parameters["properties"]["page"]["enum"] == list(range(1, 11))
    finished = 0
    for obj, raw, finish in _sample(engine, reg, "pick_page", range(4), 32):
        m = re.search(r'"page"\s*:\s*(-?[0-9.]+)', raw)
        if finish == "stop":
            assert obj is not None and obj["arguments"]["page"] in range(1, 11), raw
            finished += 1
        elif m:  # cut off after the number: still one of the enum's
            assert m.group(1) in [str(i) for i in range(1, 11)], raw
    assert finished >= 1  # 32 tokens are enough for {"tool": "pick_page", "arguments": {"page": N}}
