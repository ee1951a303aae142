"""The context budget: the overflow policy drops the oldest turns and says so."""
from __future__ import annotations

import pytest

from app.budget import ContextOverflow, fit_messages, reply_reserve
from app.engine import Engine, LoadOptions, Sampling
from app.session import ChatSession
from app.turn import finish
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
            done = finish(session.send(f"Tell me one fact about the number {i}. " + "Please be detailed. " * 5))
            if done.fit.dropped:
                dropped_reports.append(done.fit.describe_dropped())
            assert done.fit.messages[0]["content"] == "You are brief."
            assert done.result.prompt_tokens + done.fit.reserve <= 512
        assert dropped_reports, "eight long turns must overflow a 512-token window"
        assert all("oldest turn" in r for r in dropped_reports)
    finally:
        eng.close()


def counting(tokenize):
    calls = []

    def tok(msgs):
        calls.append(len(msgs))
        return tokenize(msgs)
    return tok, calls


def test_a_2000_turn_history_costs_a_few_renders():
    """L1: the cut is found by bisection, not by dropping one turn per render."""
    msgs = convo(2000)
    tok, calls = counting(words)
    fit = fit_messages(msgs, tok, n_ctx=1000, max_tokens=40)
    assert len(fit.prompt_tokens) + fit.reserve <= 1000
    assert fit.messages[0] == msgs[0] and fit.messages[-1] == msgs[-1]
    assert fit.dropped == msgs[1:1 + len(fit.dropped)] and fit.cut == len(fit.dropped)
    # Tightest cut: one turn more would have fitted no longer.
    assert len(words(msgs[:1] + msgs[1 + fit.cut - 2:])) + fit.reserve > 1000
    assert len(calls) <= 16, len(calls)


def test_the_cut_stays_put_until_the_window_fills_again():
    """L1: turns after a cut keep the same prefix (the KV cache holds), and each new cut
    frees the slack, so only one turn in several has to drop anything."""
    msgs = convo(60)
    cut, cuts = 0, []
    for turn in range(200):
        fit = fit_messages(msgs, words, n_ctx=1000, max_tokens=40, start=cut, slack=250)
        assert fit.cut >= cut  # what was left out stays out
        assert len(fit.prompt_tokens) + fit.reserve <= 1000
        if fit.cut != cut:
            cuts.append(turn)
            assert len(fit.prompt_tokens) + fit.reserve <= 1000 - 250  # the slack is free after a cut
        cut = fit.cut
        msgs = msgs + [{"role": "assistant", "content": f"a{turn} " + "w " * 10},
                       {"role": "user", "content": f"q{turn} " + "w " * 10}]
    assert 10 <= len(cuts) <= 200 // 5, cuts  # 200 turns of 28 tokens in a 960-token window


def test_an_edited_history_starts_the_cut_over():
    msgs = convo(30)
    fit = fit_messages(msgs, words, n_ctx=300, max_tokens=40, slack=50)
    assert fit.cut > 0
    shorter = msgs[:1] + msgs[-3:]  # e.g. the chat was edited: the old cut points past its end
    again = fit_messages(shorter, words, n_ctx=300, max_tokens=40, start=fit.cut, slack=50)
    assert again.cut == 0 and again.dropped == []


def _bulk_history(store, chat_id: int, turns: int) -> None:
    """Test setup only: write `turns` stored turns in one transaction (add_message commits
    each message with a full fsync, which is right for a chat and slow for 4,000 rows)."""
    import sqlite3
    import time

    rows = []
    for i in range(turns):
        rows.append((chat_id, "user", f"Question {i}: what is {i} plus {i}?", time.time()))
        rows.append((chat_id, "assistant", f"{i} plus {i} is {2 * i}. Anything else about number {i}?", time.time()))
    db = sqlite3.connect(store.path)
    with db:
        db.executemany("INSERT INTO messages (chat_id, role, content, created) VALUES (?, ?, ?, ?)", rows)
    db.close()


def test_a_2000_turn_chat_answers_and_keeps_its_cache(engine):
    """L1 with the real model: a chat of 2,000 turns (about 45x a 2k window) answers, says
    what it left out, and the next turn evaluates only what it adds."""
    from app.chat import ChatController
    from app.config import Settings
    from app.history import HistoryStore

    store = HistoryStore()
    chat = store.new_chat(system_prompt="You are brief.")
    _bulk_history(store, chat.id, 2000)
    ctl = ChatController(store, Settings(temperature=0.0, max_tokens=8, n_ctx=2048), loader=lambda e, s: engine)
    ctl.load_model("smollm2-135m")
    ctl.open_chat(chat.id)
    assert len(ctl.messages()) == 4000
    engine.reset()
    done = finish(ctl.send("And what is 7 plus 7?"))
    first, fit = done.result, done.fit
    assert first.finish_reason in ("stop", "length") and first.completion_tokens > 0
    assert fit.messages[0] == {"role": "system", "content": "You are brief."}
    assert fit.dropped and "oldest turn" in fit.describe_dropped()
    assert first.prompt_tokens + fit.reserve <= 2048
    done = finish(ctl.send("And 8 plus 8?"))
    second = done.result
    assert done.fit.cut == fit.cut  # same prefix as the turn before
    assert second.prompt_tokens_evaluated < 48, second  # not the ~1,500-token window again
    assert [m.role for m in ctl.messages()[-4:]] == ["user", "assistant", "user", "assistant"]
