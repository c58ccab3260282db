"""Text the window shows that may be long: made to wrap anywhere it has to.

Qt wraps a label at spaces only, so one long "word" (a path, a scan named
without spaces) sets the label's minimum width and pushes the pane past the
window's edge. A zero-width space after each separator inside such a word, and
every ``MAX_RUN`` characters where it has none, lets it wrap too.
"""

from __future__ import annotations

import re

ZWSP = "\u200b"
MAX_RUN = 24  # characters: a word longer than this may be broken
_LONG = re.compile(rf"\S{{{MAX_RUN + 1},}}")
_SEPARATORS = re.compile(r"([/\\_.,;:=-])")
_RUN = re.compile(rf"([^/\\_.,;:=\-{ZWSP}]{{{MAX_RUN}}})(?=[^/\\_.,;:=\-{ZWSP}])")


def wrappable(text: str) -> str:
    """``text`` with break opportunities inside its long words; short words are left alone."""

    def breakable(match: re.Match[str]) -> str:
        word = _SEPARATORS.sub(rf"\1{ZWSP}", match.group(0))
        return _RUN.sub(rf"\1{ZWSP}", word)

    return _LONG.sub(breakable, text)
