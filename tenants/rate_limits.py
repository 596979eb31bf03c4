"""Rate-limit strings (`"600/minute"`): the one place that says which ones are valid.

`RATE_LIMIT_PATTERN` is the whole grammar, `<count>/[<multiple>]<second|minute|hour|day>`; it
goes into the OpenAPI schema, and `parse_limit` refuses whatever it does not match, so the
document and the server accept exactly the same strings.
"""

from __future__ import annotations

import re
from functools import lru_cache

from limits import RateLimitItem, parse_many

RATE_LIMIT_PATTERN = r"^[1-9][0-9]{0,9}/([1-9][0-9]{0,3})?(second|minute|hour|day)$"
_RATE_LIMIT = re.compile(RATE_LIMIT_PATTERN)


@lru_cache(maxsize=1024)
def parse_limit(text: str) -> RateLimitItem:
    """`"600/minute"` → a limit; a ValueError that says what is wrong otherwise."""
    items = parse_many(text) if _RATE_LIMIT.fullmatch(text) else []
    if len(items) != 1:
        raise ValueError(
            f"invalid rate limit {text!r}: use one '<count>/<period>', e.g. 600/minute"
        )
    return items[0]
