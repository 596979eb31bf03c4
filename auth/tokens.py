"""Staff JWTs (HS256) through python-jose. The only jose user.

Decoding names its one allowed algorithm (so `alg: none` or an RS/HS confusion is refused) and
requires `exp`, `iat`, `sub` and `jti`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from jose import JWTError, jwt

ALGORITHM = "HS256"
_REQUIRED = ("exp", "iat", "sub", "jti")


class InvalidToken(Exception):
    """Any token that must not be trusted; deliberately says nothing about why."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str
    role: str
    tenant_id: str | None
    expires_at: int


def issue(*, subject: str, role: str, tenant_id: str | None, secret: str, ttl_seconds: int) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "role": role,
        "tenant_id": tenant_id,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    return str(jwt.encode(claims, secret, algorithm=ALGORITHM))


def decode(token: str, *, secret: str) -> TokenClaims:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"verify_exp": True, **{f"require_{claim}": True for claim in _REQUIRED}},
        )
    except JWTError:
        raise InvalidToken from None
    role, tenant_id = claims.get("role"), claims.get("tenant_id")
    if not isinstance(role, str) or not (tenant_id is None or isinstance(tenant_id, str)):
        raise InvalidToken
    return TokenClaims(
        subject=str(claims["sub"]), role=role, tenant_id=tenant_id, expires_at=int(claims["exp"])
    )
