"""Verified-key records held in each worker, so a prediction does not query the database.

Freshness comes from `service.changes`: every worker polls a change counter a few times a second
and clears this cache when an admin revoked, rotated, suspended or re-limited anything. The
lifetimes below are a second line of defence, not the mechanism.
"""

from __future__ import annotations

import time
from typing import Final

from auth.principals import Customer
from tenants.repository import KeyRecord

_TTL_S: Final = 60.0
_UNKNOWN_TTL_S: Final = 1.0  # an unknown key id with a valid checksum: look again soon


class KeyCache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, KeyRecord | None, Customer | None]] = {}
        self._generation = 0

    @property
    def generation(self) -> int:
        """Read before a database lookup and handed back to `put`."""
        return self._generation

    def get(self, key_id: str) -> tuple[bool, KeyRecord | None, Customer | None]:
        """(hit, record, customer); a hit with no record means the key id does not exist."""
        entry = self._entries.get(key_id)
        if entry is None or entry[0] < time.monotonic():
            return False, None, None
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
        if len(self._entries) > 100_000:  # bounded: invented key ids cannot grow it forever
            self._entries.clear()
        ttl = _TTL_S if record is not None else _UNKNOWN_TTL_S
        self._entries[key_id] = (time.monotonic() + ttl, record, customer)
        return customer

    def clear(self) -> None:
        self._entries.clear()
        self._generation += 1
