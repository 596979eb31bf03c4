"""Which model version serves a tenant: its pin, else a staged rollout's share, else the active.

The share is stable: a tenant's place in a rollout is a hash of the rollout's version and its
own id, so the same tenants are in at 50% every time, everyone in at 10% stays in at 20%, and
each new rollout starts with a different first group.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PlatformVersions:
    active: str
    rollout_version: str | None = None
    rollout_percent: int = 0


def rollout_bucket(version: str, tenant_id: str) -> int:
    """0 … 99: the tenant's place in the rollout of `version`."""
    digest = hashlib.sha256(f"{version}\x00{tenant_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def version_for(tenant_id: str, pinned: str | None, platform: PlatformVersions) -> str:
    if pinned is not None:
        return pinned
    rollout = platform.rollout_version
    if rollout is not None and rollout_bucket(rollout, tenant_id) < platform.rollout_percent:
        return rollout
    return platform.active
