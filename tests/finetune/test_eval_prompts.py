"""Prompt suites (finetune.evaluate.prompts): every check kind, the rows' figures, stored answers,
errors that name the file and line, and a judge built on the real bundled model."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from finetune.evaluate.prompts import load_suite, run_suite
from finetune.evaluate.rows import EvalError

SUITE = Path(__file__).parent / "data" / "eval" / "every_check.yaml"

# Canned answers: no model writes them, so every check's outcome is known in advance.
ANSWERS = {
    "capital": "The capital is paris.",
    "legs": "A spider has 8 legs.",
    "person-bad": 'Here it is:\n```json\n{"name": "Ann", "age": -1}\n```\nAnything else?',
    "person-ok": '{"name": "Bo", "age": 3}',
    "polite": "Please sit down.",
    "p6": "Hello, world!",
}
# The plain-Python judge: one rule per question it is asked.
RULES = {
    "Is the answer polite?": lambda answer: "please" in answer.casefold(),
    "Does the answer greet someone?": lambda answer: answer.startswith("Hi"),
}
EXPECTED = {  # id -> [passed per check], in the file's order
    "capital": [True, True],
    "legs": [True, False],
    "person-bad": [False],
    "person-ok": [True, True],
    "polite": [True, False],
    "p6": [True, False],
}


def binomial(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1))


def run_every_check(on_item=None):
    suite = load_suite(SUITE)
    asked, judged = [], []

    def answer(item):
        asked.append(item)
        return ANSWERS[item.id]

    def judge(question, prompt, answer):
        judged.append((question, prompt, answer))
        return RULES[question](answer)

    return suite, run_suite(suite, answer, judge=judge, on_item=on_item), asked, judged


def test_every_check_kind_gives_the_known_outcome_per_item():
    suite, result, asked, judged = run_every_check()
    assert suite.name == "every-check"
    assert [it.id for it in asked] == list(EXPECTED)
    assert {r.item.id: [c.passed for c in r.checks] for r in result.items} == EXPECTED
    assert [r.item.id for r in result.items if r.passed] == ["capital", "person-ok"]
    assert {c.kind for r in result.items for c in r.checks} == {
        "contains", "not_contains", "regex", "exact", "json_schema", "judge"}
    # The judge saw the question, the item's prompt and the answer.
    assert judged == [("Is the answer polite?", "Ask me to sit down.", "Please sit down."),
                      ("Does the answer greet someone?", "Say hello to the world.", "Hello, world!")]
    reasons = {r.item.id: [c.reason for c in r.checks] for r in result.items}
    assert reasons["legs"][0] == "regex '\\b8\\b' matched '8'"
    assert reasons["legs"][1] == "expected '8', got 'A spider has 8 legs.'"
    assert reasons["person-bad"][0] == "schema: -1 is less than the minimum of 0 at /age"
    assert reasons["polite"][1] == "missing 'PLEASE'"
    assert reasons["p6"][1].startswith("judge said no")


def test_items_inherit_the_suite_defaults_and_override_them():
    _, _, asked, _ = run_every_check()
    by_id = {it.id: it for it in asked}
    assert by_id["capital"].system == "You are terse." and by_id["capital"].collections == ("atlas",)
    assert by_id["capital"].tools is False
    assert by_id["legs"].system == "Answer with digits only."
    assert by_id["person-bad"].tools is True
    assert by_id["polite"].collections == ()
    assert by_id["p6"].prompt == "Say hello to the world."


def test_rows_carry_pass_rates_and_sample_standard_errors():
    _, result, _, _ = run_every_check()
    rows = {r.metric: r for r in result.rows("bundled")}
    assert list(rows) == ["pass_rate", "pass_rate:contains", "pass_rate:not_contains", "pass_rate:regex",
                          "pass_rate:exact", "pass_rate:json_schema", "pass_rate:judge"]
    assert all(r.model == "bundled" and r.suite == "prompts" and r.task == "every-check" for r in rows.values())
    figures = {m: (r.value, r.stderr, r.n) for m, r in rows.items()}
    assert figures["pass_rate"] == pytest.approx((2 / 6, binomial(2 / 6, 6), 6))
    assert figures["pass_rate:contains"] == pytest.approx((2 / 3, 1 / 3, 3))
    assert figures["pass_rate:not_contains"] == pytest.approx((1.0, 0.0, 2))
    assert figures["pass_rate:regex"] == (1.0, None, 1)  # one check: no spread to estimate
    assert figures["pass_rate:exact"] == (0.0, None, 1)
    assert figures["pass_rate:json_schema"] == pytest.approx((0.5, 0.5, 2))
    assert figures["pass_rate:judge"] == pytest.approx((0.5, 0.5, 2))


def test_answers_are_stored_as_jsonl_and_read_back(tmp_path):
    progress = []
    _, result, _, _ = run_every_check(on_item=lambda i, n, r: progress.append((i, n, r.item.id)))
    assert progress == [(i, 6, id_) for i, id_ in enumerate(EXPECTED, 1)]
    out = tmp_path / "answers" / "every-check.jsonl"
    assert result.write_answers(out, model="bundled") == out
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [d["id"] for d in lines] == list(EXPECTED)
    assert {d["id"]: d["answer"] for d in lines} == ANSWERS
    assert {d["id"]: [c["passed"] for c in d["checks"]] for d in lines} == EXPECTED
    assert [d["passed"] for d in lines] == [r.passed for r in result.items]
    assert all(d["suite"] == "every-check" and d["model"] == "bundled" for d in lines)
    assert lines[1]["checks"][1]["kind"] == "exact" and lines[1]["checks"][1]["line"] == 17
    assert sorted(p.name for p in out.parent.iterdir()) == ["every-check.jsonl"], "no temp file left behind"


def test_the_default_task_name_is_the_file_stem(tmp_path):
    path = tmp_path / "smoke.yaml"
    path.write_text("prompts:\n  - prompt: hi\n    checks:\n      - exact: yes\n")
    result = run_suite(load_suite(path), lambda item: " yes \n")
    rows = [(r.task, r.metric, r.value, r.stderr, r.n) for r in result.rows("m")]
    assert rows == [("smoke", "pass_rate", 1.0, None, 1), ("smoke", "pass_rate:exact", 1.0, None, 1)]
    assert result.items[0].item.id == "p1"


BAD = {
    "unknown check": (("prompts:\n  - prompt: a\n    checks:\n      - contains: x\n  - prompt: b\n    checks:\n"
                      "      - contians: y\n"), 7,
                      ("prompts[1].checks[0]: unknown check 'contians' "
                      "(choose contains, not_contains, regex, exact, json_schema, judge)")),
    "bad regex": ("prompts:\n  - prompt: a\n    checks:\n      - regex: '(unclosed'\n", 4,
                  "prompts[0].checks[0]: bad regex '(unclosed'"),
    "bad JSON schema": (("prompts:\n  - prompt: a\n    checks:\n      - json_schema:\n          type: object\n"
                        "          properties:\n            n: {type: 12}\n"), 7,
                        "prompts[0].checks[0].json_schema/properties/n/type: bad JSON schema"),
    "missing prompt": (("name: s\nprompts:\n  - prompt: a\n    checks: [{exact: a}]\n  - id: two\n"
                       "    checks: [{exact: a}]\n"), 5, "prompts[1]: 'prompt' is missing"),
    "empty prompt": ("prompts:\n  - prompt:\n    checks: [{exact: a}]\n", 2,
                     "prompts[0].prompt: must be a non-empty string"),
    "bad YAML": ("prompts:\n  - prompt: a\n    checks:\n      - exact: a\n   - prompt: b\n", 5, "invalid YAML"),
    "control character": ("prompts:\n  - prompt: a\x07\n", 2, "invalid YAML: unacceptable character #x0007"),
    "deep nesting": ("prompts: " + "[" * 1000, 1, "invalid YAML: nested too deeply"),
    "duplicate id": (("prompts:\n  - id: a\n    prompt: x\n    checks: [{exact: a}]\n  - id: a\n    prompt: y\n"
                     "    checks: [{exact: a}]\n"), 5, "prompts[1]: duplicate id 'a' (first at line 2)"),
    "default id taken": (("prompts:\n  - id: p2\n    prompt: x\n    checks: [{exact: a}]\n  - prompt: y\n"
                         "    checks: [{exact: a}]\n"), 5, "duplicate id 'p2'"),
    "unknown item key": ("prompts:\n  - prompt: a\n    chekcs: [{exact: a}]\n", 3,
                         "prompts[0]: unknown key 'chekcs' (choose id, prompt, system, tools, collections, checks)"),
    "no checks": ("prompts:\n  - prompt: a\n    checks: []\n", 3, "prompts[0].checks: must be a non-empty list"),
    "extra key on a check": ("prompts:\n  - prompt: a\n    checks:\n      - regex: a\n        ignore_case: true\n",
                             5, "prompts[0].checks[0]: unknown key 'ignore_case' (choose regex)"),
    "option before the kind": (("prompts:\n  - prompt: a\n    checks:\n      - ignore_case: false\n"
                               "        contians: X\n"), 5, "unknown check 'contians'"),
    "two kinds in one entry": ("prompts:\n  - prompt: a\n    checks:\n      - contains: a\n        regex: b\n", 5,
                               "prompts[0].checks[0]: one check per list entry"),
    "tools not a boolean": ("tools: maybe\nprompts:\n  - prompt: a\n    checks: [{exact: a}]\n", 1,
                            "tools: must be true or false"),
    "no prompts": ("name: s\nprompts: []\n", 2, "prompts: must be a non-empty list of prompts"),
    "empty file": ("", 1, "the suite must be a mapping"),
    "unknown suite key": ("name: s\nprompt: a\n", 2, "unknown key 'prompt'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_suites_name_the_file_and_line(tmp_path, case):
    text, line, message = BAD[case]
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(EvalError) as err:
        load_suite(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: "), msg
    assert message in msg


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(EvalError, match=re.escape(f"{tmp_path / 'nope.yaml'}: cannot read the suite")):
        load_suite(tmp_path / "nope.yaml")


def test_judge_checks_without_a_judge_are_refused_before_any_answer(tmp_path):
    path = tmp_path / "judged.yaml"
    path.write_text("prompts:\n  - prompt: a\n    checks: [{exact: a}]\n  - id: j\n    prompt: b\n"
                    "    checks:\n      - contains: b\n      - judge: Is it good?\n")
    asked = []
    with pytest.raises(EvalError) as err:
        run_suite(load_suite(path), lambda item: asked.append(item) or "a")
    assert str(err.value) == f"{path}:8: prompt 'j' has a judge check but no judge model was given"
    assert asked == [], "no answer may be generated before the refusal"


def test_a_judge_on_the_real_model_answers_yes_or_no(tmp_path, engine):
    """The judge `crofter eval --judge` uses: the bundled SmolLM2 constrained to "yes" | "no" by
    a grammar; which one it says is the model's own judgement and is not asserted, only that it
    is one of the two and the suite follows it."""
    from app.commands.eval_turns import grammar_judge

    said = []

    class Spy:  # the engine, its completions recorded
        def __getattr__(self, name):
            return getattr(engine, name)

        def complete(self, tokens, sampling):
            r = engine.complete(tokens, sampling)
            said.append(r.text)
            return r

    judge = grammar_judge(Spy())

    path = tmp_path / "judged.yaml"
    path.write_text("prompts:\n  - prompt: What is the capital of France?\n    checks:\n"
                    "      - judge: Does the answer name the capital of France?\n")
    result = run_suite(load_suite(path), lambda item: "Paris is the capital of France.", judge=judge)
    assert len(said) == 1 and said[0] in ("yes", "no")
    (check,) = result.items[0].checks
    assert check.passed is (said[0] == "yes")
    assert result.items[0].passed is check.passed
    assert check.reason.startswith(f"judge said {said[0]}")
    row = result.rows("smollm2-135m")[0]
    assert row.metric == "pass_rate" and row.value == (1.0 if said[0] == "yes" else 0.0) and row.n == 1


def test_a_schema_ref_to_nowhere_is_the_suites_fault_not_the_answers(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text("prompts:\n  - prompt: a\n    checks:\n      - json_schema: {$ref: '#/definitions/nope'}\n")
    suite = load_suite(path)  # the meta-schema accepts any $ref string; it fails when applied
    with pytest.raises(EvalError, match=re.escape(f"{path}:4: json_schema cannot be applied")):
        run_suite(suite, lambda item: "{}")
