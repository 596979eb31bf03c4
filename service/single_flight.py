"""One call at a time per key: whoever asks while one is under way waits for that one.

What a cold cache needs in front of what fills it: when an entry is missing (a worker's start,
a key's record expired or cleared, a tenant's new month, a model version not loaded yet), every
request in flight for it finds it missing at once. Each asking the database itself made a burst
of identical queries, and the requests waited behind all of them (perf/README.md, "Session
10"); each loading a model would hold one copy of it a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._under_way: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """`call()`'s outcome for `key`: from the call under way for it, else a new one."""
        under_way = self._under_way.get(key)
        if under_way is None:
            under_way = self._under_way[key] = asyncio.ensure_future(call())
            under_way.add_done_callback(partial(self._finished, key))
        # Shielded: a caller that is cancelled (its client left) leaves the call to the others.
        return await asyncio.shield(under_way)

    def _finished(self, key: K, done: asyncio.Future[V]) -> None:
        del self._under_way[key]  # a call that failed is made again by the next caller
        if not done.cancelled():
            done.exception()  # retrieved: each caller got it already
