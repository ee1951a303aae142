"""A conversation: history, context budget and the generation loop, in plain Python.

The CLI and the Textual app both drive a `ChatSession`; neither knows about
token budgets or templates. One turn:

    >>> s = ChatSession(engine, Sampling(temperature=0), system="Be brief.")  # doctest: +SKIP
    >>> for ev in s.send("What is the capital of France?"):
    ...     print(ev.text, end="")                                             # doctest: +SKIP
    >>> s.last_fit.dropped, s.last_result.prompt_tokens_evaluated             # doctest: +SKIP
    ([], 31)
"""
from __future__ import annotations

import threading
from typing import Iterator

from .budget import Fit, fit_messages
from .engine import Engine, Event, Result, Sampling


class ChatSession:
    """Messages of one chat plus the engine that answers them."""

    def __init__(self, engine: Engine, sampling: Sampling, system: str = "", messages: list[dict] | None = None):
        self.engine = engine
        self.sampling = sampling
        self.messages: list[dict] = list(messages or [])
        if system and not (self.messages and self.messages[0]["role"] == "system"):
            self.messages.insert(0, {"role": "system", "content": system})
        self._last_fit: Fit | None = None
        self.cut = 0  # messages (after the system prompt) the overflow policy has left out for good
        self.tools: list[dict] | None = None  # tool specs for templates that render them natively
        self.last_result: Result | None = None

    @property
    def last_fit(self) -> Fit | None:
        """The fit of the last turn sent; setting it keeps its cut for the turns after."""
        return self._last_fit

    @last_fit.setter
    def last_fit(self, fit: Fit | None) -> None:
        self._last_fit = fit
        if fit is not None:
            self.cut = fit.cut

    def fit(self, messages: list[dict] | None = None) -> Fit:
        """What the next turn would send, after the overflow policy: turns left out earlier
        stay out, and a new cut leaves a quarter of the window free, so the prompt's prefix
        (and llama.cpp's KV cache of it) stays the same for the turns that follow."""
        n_ctx = self.engine.n_ctx
        return fit_messages(
            self.messages if messages is None else messages,
            lambda msgs: self.engine.tokenize_chat(msgs, self.tools),
            n_ctx,
            self.sampling.max_tokens,
            start=self.cut,
            slack=n_ctx // 4,
        )

    def send(self, text: str, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Add a user message and stream the reply; the reply joins the history when done.

        A cancelled reply is kept with what it said so far; `last_result.finish_reason`
        tells it apart.
        """
        self.messages.append({"role": "user", "content": text})
        return self._reply(cancel)

    def regenerate(self, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Drop the last assistant reply and answer the last user message again."""
        while self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        return self._reply(cancel)

    def _reply(self, cancel: threading.Event | None) -> Iterator[Event]:
        fit = self.fit()
        self.last_fit = fit
        for ev in self.engine.stream(fit.prompt_tokens, self.sampling, cancel):
            if ev.done is not None:
                self.last_result = ev.done
                self.messages.append({"role": "assistant", "content": ev.done.text})
            yield ev
