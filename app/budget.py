"""The context budget: what fits in n_ctx, and an explicit policy when it does not.

The policy: keep the system prompt, keep the newest user message, and drop the
oldest whole turns (a user message and every reply or tool message after it)
until the prompt plus the reply reserve fits. What was dropped is reported, never
silent (Ollama #8531). If even the system prompt and the last message cannot fit,
`ContextOverflow` says how many tokens were needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


class ContextOverflow(Exception):
    """The newest message cannot fit in the context window, even alone."""


@dataclass
class Fit:
    """The messages that go to the model this turn, and the cost in tokens.

    prompt_tokens: token ids of the rendered prompt (what the engine evaluates).
    dropped: messages left out by the overflow policy, oldest first.
    """

    messages: list[dict]
    prompt_tokens: list[int]
    reserve: int
    n_ctx: int
    dropped: list[dict] = field(default_factory=list)

    def describe_dropped(self) -> str | None:
        if not self.dropped:
            return None
        turns = sum(1 for m in self.dropped if m["role"] == "user")
        return f"context full: left out the {turns} oldest turn(s) ({len(self.dropped)} messages) to fit {self.n_ctx} tokens"


def reply_reserve(max_tokens: int, n_ctx: int) -> int:
    """Tokens kept free for the reply: max_tokens, but never more than half the window."""
    return max(1, min(max_tokens, n_ctx // 2))


def _turn_starts(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def fit_messages(
    messages: list[dict],
    tokenize: Callable[[list[dict]], list[int]],
    n_ctx: int,
    max_tokens: int,
) -> Fit:
    """Apply the overflow policy to `messages` for a window of `n_ctx` tokens.

    `tokenize` renders messages with the chat template and returns token ids.
    """
    reserve = reply_reserve(max_tokens, n_ctx)
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped: list[dict] = []
    while True:
        tokens = tokenize(system + rest)
        if len(tokens) + reserve <= n_ctx:
            return Fit(system + rest, tokens, reserve, n_ctx, dropped)
        starts = _turn_starts(rest)
        # Drop everything before the second turn start: the oldest whole turn
        # (or any leading non-user messages), never the newest user message.
        if len(starts) < 2 and not (starts and starts[0] > 0):
            raise ContextOverflow(
                f"the prompt needs {len(tokens)} tokens plus {reserve} reserved for the reply, "
                f"but the context window is {n_ctx} tokens; shorten the message or raise --n-ctx"
            )
        cut = starts[1] if starts[0] == 0 else starts[0]
        dropped.extend(rest[:cut])
        rest = rest[cut:]
