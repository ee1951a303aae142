"""The context budget: the overflow policy drops the oldest turns and says so."""
from __future__ import annotations

import pytest

from app.budget import ContextOverflow, fit_messages, reply_reserve
from app.engine import Engine, LoadOptions, Sampling
from app.session import ChatSession
from models.registry import ModelEntry


def words(messages):
    """A stand-in tokenizer: one token per word plus 3 per message of template."""
    return [0] * sum(len(m["content"].split()) + 3 for m in messages)


def convo(turns: int, words_each: int = 10):
    msgs = [{"role": "system", "content": "be kind"}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"q{i} " + "w " * words_each})
        msgs.append({"role": "assistant", "content": f"a{i} " + "w " * words_each})
    msgs.append({"role": "user", "content": "last question"})
    return msgs


def test_everything_fits_nothing_dropped():
    fit = fit_messages(convo(2), words, n_ctx=200, max_tokens=50)
    assert fit.dropped == [] and fit.describe_dropped() is None
    assert len(fit.prompt_tokens) + fit.reserve <= 200


def test_oldest_turns_dropped_system_and_last_kept():
    msgs = convo(6)
    fit = fit_messages(msgs, words, n_ctx=100, max_tokens=40)
    assert fit.messages[0] == msgs[0]  # system prompt kept
    assert fit.messages[-1] == msgs[-1]  # the new question kept
    assert fit.dropped == msgs[1 : 1 + len(fit.dropped)]  # a prefix of the oldest messages
    assert len(fit.dropped) % 2 == 0  # whole turns: user + assistant
    assert fit.messages[1]["role"] == "user"
    assert len(fit.prompt_tokens) + fit.reserve <= 100
    assert "oldest turn" in fit.describe_dropped()


def test_single_message_too_big_is_a_clear_error():
    msgs = [{"role": "user", "content": "w " * 500}]
    with pytest.raises(ContextOverflow, match="context window is 100 tokens"):
        fit_messages(msgs, words, n_ctx=100, max_tokens=10)


def test_reserve_never_more_than_half_the_window():
    assert reply_reserve(4096, 2048) == 1024
    assert reply_reserve(100, 2048) == 100


def test_overflow_with_the_real_model(bundled_path):
    """A long chat in a 512-token window keeps answering and reports what it dropped."""
    eng = Engine.load(ModelEntry("s", str(bundled_path), "gguf"), LoadOptions(n_ctx=512))
    try:
        session = ChatSession(eng, Sampling(temperature=0, max_tokens=64), system="You are brief.")
        dropped_reports = []
        for i in range(8):
            list(session.send(f"Tell me one fact about the number {i}. " + "Please be detailed. " * 5))
            if session.last_fit.dropped:
                dropped_reports.append(session.last_fit.describe_dropped())
            assert session.last_fit.messages[0]["content"] == "You are brief."
            assert session.last_result.prompt_tokens + session.last_fit.reserve <= 512
        assert dropped_reports, "eight long turns must overflow a 512-token window"
        assert all("oldest turn" in r for r in dropped_reports)
    finally:
        eng.close()
