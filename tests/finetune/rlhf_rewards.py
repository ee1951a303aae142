"""Reward functions the GRPO tests load through --reward python:MODULE:FUNC (plain text in, numbers out)."""


def brief(prompts, completions, **kwargs):
    """A format reward: 1 for a reply of at most six words, else 0."""
    return [1.0 if 0 < len(c.split()) <= 6 else 0.0 for c in completions]


def opens_with_the(prompts, completions, **kwargs):
    """A format reward the 135M model meets about a third of the time when sampling: the reply opens with "The"."""
    return [1.0 if c.lstrip().startswith("The ") else 0.0 for c in completions]


def not_numbers(prompts, completions, **kwargs):
    return ["good" for _ in completions]


def wrong_count(prompts, completions, **kwargs):
    return [1.0]


def fails(prompts, completions, **kwargs):
    return [1 / 0 for _ in completions]
