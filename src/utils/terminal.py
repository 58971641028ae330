"""Text shown on a terminal."""

from __future__ import annotations

# Control characters other than tab and newline: C0, DEL and C1. A model can emit them (an
# untrained one does), and ESC sequences written to a terminal can move the cursor, recolour
# or retitle it. Text shown to a person goes through ``printable``.
_CONTROL = {c: None for c in [*range(0, 9), *range(11, 32), *range(127, 160)]}


def printable(text: str) -> str:
    """``text`` without control characters other than tab and newline, for a terminal."""
    return text.translate(_CONTROL)
