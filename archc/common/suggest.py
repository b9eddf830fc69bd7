"""Suggestions for a misspelt name ("did you mean ...?"), torch-free: the one home of their wording.

Closeness is difflib's ratio 2*M/T (M matched characters, T the two names' total length); a name
is suggested when its ratio with the misspelt word is at least 0.6, the closest first.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

CUTOFF = 0.6  # the smallest ratio 2*M/T of a suggestion


def close_matches(word: object, choices: Iterable[str], n: int = 1) -> list[str]:
    """Up to `n` of `choices` whose ratio with `word` is at least `CUTOFF`, closest first."""
    return difflib.get_close_matches(str(word), list(choices), n=n, cutoff=CUTOFF)


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """` (did you mean 'name'?)` for the one closest of `choices`, or "" when none is close."""
    close = close_matches(word, choices)
    return f" (did you mean {close[0]!r}?)" if close else ""


def did_you_mean_any(word: object, choices: Iterable[str], n: int = 3) -> str:
    """`; did you mean a, b, c?` for up to `n` close `choices`, or "" when none is close."""
    close = close_matches(word, choices, n)
    return f"; did you mean {', '.join(close)}?" if close else ""
