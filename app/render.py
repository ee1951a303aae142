"""Text from models, documents and file names, made safe to show, and code blocks found in it.

Untrusted text is never interpreted: the TUI shows it as plain text or Markdown,
never as Rich markup, and C0/C1 control characters (ANSI escapes included) are
replaced by visible symbols so they cannot restyle or corrupt the terminal; bidi
overrides are shown by name so they cannot reorder what is displayed.

    >>> display_safe("\\x1b[31mred\\x1b[0m")
    '␛[31mred␛[0m'
    >>> display_safe("abc\u202edef")
    'abc⟨U+202E⟩def'
    >>> code_blocks("Try:\\n```python\\nprint(1)\\n```\\n")
    ['print(1)']
"""
from __future__ import annotations

import re

# Keep tab and newline; show every other control character as its Unicode
# "control picture" (U+2400 + code; DEL -> U+2421), C1 controls as U+FFFD.
_CONTROL = {c: chr(0x2400 + c) for c in range(0x20) if c not in (0x09, 0x0A)}
_CONTROL[0x7F] = "\u2421"
_CONTROL.update({c: "\ufffd" for c in range(0x80, 0xA0)})
# Bidirectional embeddings, overrides and isolates reorder what the terminal shows
# ("Trojan Source"): named instead of obeyed. Ordinary right-to-left text needs none of them.
_CONTROL.update({c: f"\u27e8U+{c:04X}\u27e9" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})
_FENCE = re.compile(r"^(```+|~~~+)[^\n]*\n(.*?)^\1[ \t]*$", re.DOTALL | re.MULTILINE)


def display_safe(text: str) -> str:
    """`text` with control characters made visible (and \\r\\n normalised)."""
    return text.replace("\r\n", "\n").translate(_CONTROL)


def code_blocks(markdown: str) -> list[str]:
    """The contents of the fenced code blocks in `markdown`, in order."""
    return [m.group(2).rstrip("\n") for m in _FENCE.finditer(markdown)]
