"""Who is calling: a customer (an API key of one tenant) or a staff user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["predict", "usage:read"]
ALL_SCOPES: tuple[Scope, ...] = ("predict", "usage:read")
Role = Literal["admin", "auditor"]


@dataclass(frozen=True, slots=True)
class Customer:
    key_id: str
    tenant_id: str
    scopes: frozenset[str]
    rate_limit: str
    """The limit that applies: the key's own, else its tenant's."""
    max_batch_size: int
    monthly_quota: int | None
    pinned_model_version: str | None = None
    """The version the tenant is pinned to; None follows the platform."""
    allow_version_choice: bool = False

    @property
    def rate_limit_key(self) -> str:
        # Per key id: never the raw key, never the client address.
        return f"key:{self.key_id}"


@dataclass(frozen=True, slots=True)
class Staff:
    user_id: str
    username: str
    role: Role
    tenant_id: str | None
    """None: the whole platform. Otherwise this staff member sees only this tenant."""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
