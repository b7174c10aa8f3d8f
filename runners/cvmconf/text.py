"""Text from tests, kernel logs and probes made safe to show: characters that would drive a
terminal, or that a format cannot carry, written as \\xNN escapes."""
from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def escape_chars(text: str, chars: re.Pattern) -> str:
    """text with every character chars matches written as a \\xNN escape."""
    return chars.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def printable(text: str) -> str:
    """Control characters from test output shown as escapes (they would drive the terminal)."""
    return escape_chars(text, _CONTROL)
