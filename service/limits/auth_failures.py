"""Failed API-key authentications per client address: past the limit, 429 before any lookup.

Counted in each worker's memory, not in the shared limiter: a refusal must cost no round trip
(a flood is exactly when Redis round trips hurt), and with N workers an address gets at most
N times the limit before every worker refuses it — still a few hundred guesses a minute against
keys whose secrets have 190 bits. Each address has a fixed window of the limit's length; the
table is bounded, and when it is full the expired windows go first, then the oldest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Final

from tenants.rate_limits import parse_limit

_MAX_ADDRESSES: Final = 100_000


@dataclass(slots=True)
class _Window:
    started: float
    failures: int = 0
    warned: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    blocked: bool
    retry_after: int = 0
    first_in_window: bool = False
    """True once per address and window: the moment to log a warning."""


class AuthFailures:
    def __init__(self, limit: str) -> None:
        item = parse_limit(limit)
        self.limit, self.window = item.amount, float(item.get_expiry())
        self._windows: dict[str, _Window] = {}

    def check(self, address: str) -> Verdict:
        """Is this address over its failures? Cheap: a dict lookup, no I/O."""
        now = time.monotonic()
        state = self._windows.get(address)
        if state is None or state.started + self.window <= now or state.failures < self.limit:
            return Verdict(blocked=False)
        first = not state.warned
        state.warned = True
        retry_after = max(1, math.ceil(state.started + self.window - now))
        return Verdict(blocked=True, retry_after=retry_after, first_in_window=first)

    def record(self, address: str) -> None:
        now = time.monotonic()
        state = self._windows.get(address)
        if state is None or state.started + self.window <= now:
            if state is None and len(self._windows) >= _MAX_ADDRESSES:
                self._make_room(now)
            state = self._windows[address] = _Window(started=now)
        state.failures += 1

    def _make_room(self, now: float) -> None:
        for address, state in list(self._windows.items()):
            if state.started + self.window <= now:
                del self._windows[address]
        while len(self._windows) >= _MAX_ADDRESSES:  # all live: drop the oldest (insertion order)
            del self._windows[next(iter(self._windows))]
