"""Reading ``/proc/self/mountinfo`` fields."""

from __future__ import annotations

import re

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """A mountinfo path field as the path it names (the kernel writes space, tab, newline and
    backslash as ``\\ooo`` octal escapes)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field) if "\\" in field else field
