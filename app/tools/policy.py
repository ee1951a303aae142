"""Who decides whether a requested call runs: allow, ask or deny, per tool.

Defaults: read-only tools `allow`, everything else `ask`. Once a turn has seen
text from documents or tool results ("tainted"), a side-effecting tool is never
past `ask`, whatever its rule says, and a tool reading the user's files (`private`)
is asked about unless the user allowed it by name: injected instructions cannot run
either unseen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .schema import Tool

DECISIONS = ("allow", "ask", "deny")


@dataclass
class Policy:
    rules: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, rule in self.rules.items():
            if rule not in DECISIONS:
                raise ValueError(f"tool {name!r}: policy must be one of {', '.join(DECISIONS)}, not {rule!r}")

    def decide(self, t: Tool, tainted: bool) -> str:
        explicit = self.rules.get(t.name)
        rule = explicit or ("ask" if t.side_effects else "allow")
        if rule == "allow" and tainted and (t.side_effects or (t.private and explicit is None)):
            return "ask"
        return rule
