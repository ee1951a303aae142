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
    cut: how many messages after the system prompt were left out (the next turn's `start`).
    """

    messages: list[dict]
    prompt_tokens: list[int]
    reserve: int
    n_ctx: int
    dropped: list[dict] = field(default_factory=list)
    cut: int = 0

    def describe_dropped(self) -> str | None:
        if not self.dropped:
            return None
        turns = sum(1 for m in self.dropped if m["role"] == "user")
        return f"context full: left out the {turns} oldest turn(s) ({len(self.dropped)} messages) to fit {self.n_ctx} tokens"


def reply_reserve(max_tokens: int, n_ctx: int) -> int:
    """Tokens kept free for the reply: max_tokens, but never more than half the window."""
    return max(1, min(max_tokens, n_ctx // 2))


def fit_messages(
    messages: list[dict],
    tokenize: Callable[[list[dict]], list[int]],
    n_ctx: int,
    max_tokens: int,
    start: int = 0,
    slack: int = 0,
) -> Fit:
    """Apply the overflow policy to `messages` for a window of `n_ctx` tokens.

    `tokenize` renders messages with the chat template and returns token ids.
    `start`: messages after the system prompt already left out by an earlier turn; they
    stay out, so the prompt's prefix (and the KV cache built on it) stays the same from
    turn to turn. `slack`: when turns must be dropped, drop enough to leave this many
    tokens free as well, so the next turns fit without dropping again (llama.cpp's own
    server discards half its window when it fills, for the same reason).

    The cut is found by bisection over the turn starts (the prompt only shrinks as
    turns go), so a chat of 2,000 turns costs ~13 renders, not 2,000.
    """
    reserve = reply_reserve(max_tokens, n_ctx)
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    if not 0 <= start < len(rest) or rest[start]["role"] != "user":
        start = 0  # no earlier cut, or the history changed under it: start over
    tokens = tokenize(system + rest[start:])
    if len(tokens) + reserve <= n_ctx:
        return Fit(system + rest[start:], tokens, reserve, n_ctx, rest[:start], start)
    # Cutting at a turn start drops every message before it; the newest user message
    # (the last start) is never dropped.
    starts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > start]
    cache: dict[int, list[int]] = {}

    def size(cut: int) -> int:
        if cut not in cache:
            cache[cut] = tokenize(system + rest[cut:])
        return len(cache[cut])

    for budget in (n_ctx - reserve - slack, n_ctx - reserve):
        if starts and size(starts[-1]) <= budget:
            lo, hi = 0, len(starts) - 1  # the smallest j whose cut fits
            while lo < hi:
                mid = (lo + hi) // 2
                if size(starts[mid]) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            cut = starts[lo]
            return Fit(system + rest[cut:], cache[cut], reserve, n_ctx, rest[:cut], cut)
    needed = size(starts[-1]) if starts else len(tokens)
    raise ContextOverflow(
        f"the prompt needs {needed} tokens plus {reserve} reserved for the reply, "
        f"but the context window is {n_ctx} tokens; shorten the message or raise --n-ctx"
    )
