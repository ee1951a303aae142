"""Text from models, documents and file names, made safe to show, and code blocks found in it.

Untrusted text is never interpreted: the TUI shows it as plain text or Markdown,
never as Rich markup, and C0/C1 control characters (ANSI escapes included) are
replaced by visible symbols so they cannot restyle or corrupt the terminal.

    >>> display_safe("\\x1b[31mred\\x1b[0m")
    '␛[31mred␛[0m'
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
_FENCE = re.compile(r"^(```+|~~~+)[^\n]*\n(.*?)^\1[ \t]*$", re.DOTALL | re.MULTILINE)


def display_safe(text: str) -> str:
    """`text` with control characters made visible (and \\r\\n normalised)."""
    return text.replace("\r\n", "\n").translate(_CONTROL)


def code_blocks(markdown: str) -> list[str]:
    """The contents of the fenced code blocks in `markdown`, in order."""
    return [m.group(2).rstrip("\n") for m in _FENCE.finditer(markdown)]
