"""A conversation: history and context budget, in plain Python.

Turns are run by `turn.run_turn`; `send` and `regenerate` are its shortcuts:

    >>> s = ChatSession(engine, Sampling(temperature=0), system="Be brief.")  # doctest: +SKIP
    >>> for ev in s.send("What is the capital of France?"):
    ...     print(getattr(ev, "text", ""), end="")                           # doctest: +SKIP
    >>> ev.fit.dropped, ev.result.prompt_tokens_evaluated                    # doctest: +SKIP
    ([], 31)
"""
from __future__ import annotations

import threading
from typing import Iterator

from .budget import Fit, fit_messages
from .engine import Engine, Sampling


class ChatSession:
    """Messages of one chat plus the engine that answers them."""

    def __init__(self, engine: Engine, sampling: Sampling, system: str = "", messages: list[dict] | None = None):
        self.engine = engine
        self.sampling = sampling
        self.messages: list[dict] = list(messages or [])
        if system and not (self.messages and self.messages[0]["role"] == "system"):
            self.messages.insert(0, {"role": "system", "content": system})
        self.cut = 0  # messages (after the system prompt) the overflow policy has left out for good

    def fit(self, messages: list[dict] | None = None, tools: list[dict] | None = None) -> Fit:
        """What the next turn would send, after the overflow policy: turns left out earlier
        stay out, and a new cut leaves a quarter of the window free, so the prompt's prefix
        (and llama.cpp's KV cache of it) stays the same for the turns that follow. `tools`:
        tool specs for a template that renders them itself."""
        n_ctx = self.engine.n_ctx
        return fit_messages(
            self.messages if messages is None else messages,
            lambda msgs: self.engine.tokenize_chat(msgs, tools),
            n_ctx,
            self.sampling.max_tokens,
            start=self.cut,
            slack=n_ctx // 4,
        )

    def send(self, text: str, cancel: threading.Event | None = None, **uses) -> Iterator:
        """One turn (see turn.run_turn): the user's message, then the reply's events. A stopped
        reply is kept with what it said so far; its `Done.finish_reason` is "cancelled"."""
        from .turn import run_turn

        return run_turn(self, text, cancel=cancel, **uses)

    def regenerate(self, cancel: threading.Event | None = None, **uses) -> Iterator:
        """Answer the last user message again (the last reply is replaced)."""
        from .turn import run_turn

        return run_turn(self, None, cancel=cancel, **uses)
