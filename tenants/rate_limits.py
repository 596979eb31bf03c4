"""Rate-limit strings (`"600/minute"`): the one place that says which ones are valid."""

from __future__ import annotations

from functools import lru_cache

from limits import RateLimitItem, parse_many


@lru_cache(maxsize=1024)
def parse_limit(text: str) -> RateLimitItem:
    """`"600/minute"` → a limit; a ValueError that says what is wrong otherwise."""
    try:
        items = parse_many(text)
    except ValueError:
        items = []
    # A count of 0 parses, but a limit that refuses everything is a typo; suspension says it.
    if len(items) != 1 or items[0].amount < 1:
        raise ValueError(
            f"invalid rate limit {text!r}: use one '<count>/<period>', e.g. 600/minute"
        )
    return items[0]
