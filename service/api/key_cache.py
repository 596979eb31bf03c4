"""Verified-key records held in each worker, so a prediction does not query the database.

Freshness comes from `service.changes`: every worker polls a change counter a few times a second
and clears this cache when an admin revoked, rotated, suspended or re-limited anything. The
lifetimes below are a second line of defence, not the mechanism.

Bounded as an LRU: past `max_entries` the least recently used entry goes, one at a time, so a
burst of new key ids never evicts the keys customers are using. Invented keys mostly never get
here: their tag fails (`auth.keys.was_issued`) before any lookup, and a legacy (untagged) key is
looked up only when its id is in `legacy_ids`, the key ids that existed when the worker
started (keys issued since then all carry tags).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final

from auth.principals import Customer
from service.single_flight import SingleFlight
from tenants.repository import KeyRecord

_TTL_S: Final = 60.0
_UNKNOWN_TTL_S: Final = 1.0  # a tagged key id that is not (yet) in the database: look again soon
_MAX_ENTRIES: Final = 100_000


class KeyCache:
    def __init__(
        self, *, legacy_ids: frozenset[str] = frozenset(), max_entries: int = _MAX_ENTRIES
    ) -> None:
        self._entries: OrderedDict[str, tuple[float, KeyRecord | None, Customer | None]] = (
            OrderedDict()
        )
        self._generation = 0
        self._max_entries = max_entries
        self.legacy_ids = legacy_ids
        self.lookups: SingleFlight[tuple[str, int], tuple[KeyRecord | None, Customer | None]] = (
            SingleFlight()
        )
        """Database lookups of missing keys, by key id and generation: one at a time for each,
        each answering what it `put`. A lookup begun before a clear is not shared with requests
        that arrive after it."""

    @property
    def generation(self) -> int:
        """Read before a database lookup and handed back to `put`."""
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key_id: str) -> tuple[bool, KeyRecord | None, Customer | None]:
        """(hit, record, customer); a hit with no record means the key id does not exist."""
        entry = self._entries.get(key_id)
        if entry is None or entry[0] < time.monotonic():
            return False, None, None
        self._entries.move_to_end(key_id)
        return True, entry[1], entry[2]

    def put(self, key_id: str, record: KeyRecord | None, *, generation: int) -> Customer | None:
        """Cache what was read, unless the cache was cleared while it was being read.

        A lookup that started before a revocation and finished after the clear it caused holds
        the old row; caching it would let the revoked key in for another whole TTL.
        """
        customer = None
        if record is not None:
            customer = Customer(
                key_id=record.key_id,
                tenant_id=record.tenant_id,
                scopes=record.scopes,
                rate_limit=record.rate_limit,
                max_batch_size=record.max_batch_size,
                monthly_quota=record.monthly_quota,
                pinned_model_version=record.pinned_model_version,
                allow_version_choice=record.allow_version_choice,
            )
        if generation != self._generation:
            return customer
        ttl = _TTL_S if record is not None else _UNKNOWN_TTL_S
        self._entries[key_id] = (time.monotonic() + ttl, record, customer)
        self._entries.move_to_end(key_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return customer

    def clear(self) -> None:
        self._entries.clear()
        self._generation += 1
