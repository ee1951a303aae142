"""The engine on the real bundled model through real llama.cpp."""
from __future__ import annotations

import threading

import pytest

from app.engine import Sampling
from app.session import ChatSession
from app.turn import finish
from tests.anchors import raw_greedy

# Greedy with the default repeat penalty: the 135M Q4_1 model loops without it.
GREEDY = Sampling(temperature=0.0, max_tokens=48, repeat_penalty=1.1)


def ask(engine, text, sampling=GREEDY):
    return engine.tokenize_chat([{"role": "user", "content": text}]), sampling


def test_greedy_reply_equals_plain_llama_cpp(engine, raw_llm):
    tokens, s = ask(engine, "What is the capital of France?")
    engine.reset()
    result = engine.complete(tokens, s)
    assert result.text and result.text == raw_greedy(raw_llm, tokens, s.max_tokens)
    assert result.finish_reason in ("stop", "length")
    assert result.completion_tokens > 0 and result.prompt_tokens == len(tokens)


def test_a_grammar_forces_a_known_answer(engine):
    from llama_cpp import LlamaGrammar

    grammar = LlamaGrammar.from_string('root ::= "The capital of France is " ("Paris" | "Lyon") "."', verbose=False)
    tokens, _ = ask(engine, "What is the capital of France?")
    r = engine.complete(tokens, Sampling(temperature=0.0, max_tokens=24, grammar=grammar))
    assert r.text in ("The capital of France is Paris.", "The capital of France is Lyon.")


def test_streamed_equals_non_streamed(engine):
    tokens, s = ask(engine, "Name three colours.")
    pieces, done = [], None
    engine.reset()
    for ev in engine.stream(tokens, s):
        pieces.append(ev.text)
        done = ev.done or done
    engine.reset()  # same cache state for both runs (see Engine.reset)
    again = engine.complete(tokens, s)
    assert "".join(pieces) == done.text == again.text
    assert len([p for p in pieces if p]) > 1  # it really streamed


def test_prefix_reuse_on_follow_up_turn(engine):
    engine.reset()
    session = ChatSession(engine, GREEDY, system="You are terse.")
    first = finish(session.send("What is the capital of France?")).result
    assert first.prompt_tokens_evaluated == first.prompt_tokens
    follow_up = "And of Italy?"
    new_tokens = len(engine.tokenize(follow_up, special=False))
    second = finish(session.send(follow_up)).result
    # What the turn adds: the new message and the template tokens around it, plus any tail of
    # the first reply that tokenizes differently as text than it was generated (how much
    # depends on the reply's words, which differ between CPUs). Nothing of the first prompt.
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
    assert new_tokens < second.prompt_tokens_evaluated <= second.prompt_tokens - first.prompt_tokens, (first, second)


def test_stop_sequence_cuts_the_reply(engine):
    tokens, _ = ask(engine, "Count from 1 to 20 separated by commas.")
    engine.reset()
    free = engine.complete(tokens, Sampling(temperature=0.0, max_tokens=64))
    assert len(free.text) >= 12, free  # whatever this CPU's kernels make of it, there is text to cut
    # A stop sequence taken from this machine's own free reply: two characters from its middle.
    stop = free.text[len(free.text) // 2:][:2]
    engine.reset()
    stopped = engine.complete(tokens, Sampling(temperature=0.0, max_tokens=64, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stop not in stopped.text


def test_max_tokens_gives_length(engine):
    r = engine.complete(*ask(engine, "Write a long story about a dragon.", Sampling(temperature=0.0, max_tokens=5)))
    assert r.finish_reason == "length"
    assert r.completion_tokens == 5


def test_cancel_stops_mid_stream(engine):
    tokens, _ = ask(engine, "Write a long story about a dragon.")
    cancel = threading.Event()
    seen = 0
    done = None
    for ev in engine.stream(tokens, Sampling(temperature=0.0, max_tokens=400), cancel):
        if ev.text:
            seen += 1
            if seen == 3:
                cancel.set()
        done = ev.done or done
    assert done.finish_reason == "cancelled"
    assert done.completion_tokens < 10


def test_closing_the_stream_early_frees_the_worker(engine, raw_llm):
    tokens, _ = ask(engine, "Write a long story about a dragon.")
    stream = engine.stream(tokens, Sampling(temperature=0.0, max_tokens=400))
    next(stream)
    stream.close()  # the consumer walked away
    engine.reset()  # queued behind the abandoned generation: returns only if the worker is free
    tokens, s = ask(engine, "What is the capital of France?")
    r = engine.complete(tokens, s)
    assert r.text == raw_greedy(raw_llm, tokens, s.max_tokens)  # and the next reply is whole


def test_same_seed_same_text(engine):
    tokens, _ = ask(engine, "Tell me a joke.")
    s = Sampling(temperature=1.0, seed=1234, max_tokens=24)
    assert engine.complete(tokens, s).text == engine.complete(tokens, s).text


def test_template_comes_from_the_gguf(engine):
    assert engine.template.source == "gguf" and engine.template.warning is None
    prompt = engine.template.render([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    tokens = engine.tokenize(prompt)
    assert tokens[:2] != [engine.llm.token_bos()] * 2  # never a doubled BOS


def test_fallback_template_warns():
    from app.template import ChatTemplate

    broken = ChatTemplate.from_metadata({"tokenizer.chat_template": "{% for %}"}, bos="<s>", eos="</s>")
    assert broken.source == "chatml" and "failed to render" in broken.warning
    missing = ChatTemplate.from_metadata({}, bos="<s>", eos="</s>")
    assert "no chat template" in missing.warning
    assert "<|im_start|>user\nhi<|im_end|>" in missing.render([{"role": "user", "content": "hi"}])


def test_sandboxed_template_cannot_reach_python():
    from app.template import ChatTemplate

    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    t = ChatTemplate.from_metadata({"tokenizer.chat_template": hostile}, bos="", eos="")
    assert t.source == "chatml"  # the sandbox refused it, so the fallback is in use
    assert "failed to render" in t.warning


def test_prompt_longer_than_context_is_an_error(engine):
    from app.engine import EngineError

    with pytest.raises(EngineError, match="context window"):
        list(engine.stream([1] * 5000, GREEDY))
