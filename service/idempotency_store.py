"""Where `Idempotency-Key` requests are remembered: Redis when limits are shared there, else the
database. Both give every worker and instance the same view.

A first request *claims* its (scope, key) with a short in-flight lifetime, so a worker that
dies mid-request does not block the key for a day; its answer then replaces the claim for the
full lifetime. A claim that is not worth keeping (the answer was a refusal to retry) is
released.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import orjson
from redis import asyncio as aioredis
from sqlalchemy import Engine, delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from tenants.database import unit_of_work
from tenants.tables import IdempotencyRecord

IN_FLIGHT_TTL_S = 60
"""How long a claim outlives a worker that died before answering."""
_PURGE_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    fingerprint: str
    status_code: int | None
    """None while the first request is still in flight."""
    content_type: str | None = None
    body: bytes = b""


class IdempotencyStore(Protocol):
    async def claim(self, scope: str, key: str, fingerprint: str) -> StoredAnswer | None:
        """None: claimed for this request; else what the key already holds."""

    async def save(self, scope: str, key: str, answer: StoredAnswer) -> None: ...

    async def release(self, scope: str, key: str) -> None: ...

    async def close(self) -> None: ...


class RedisIdempotencyStore:
    def __init__(self, uri: str, *, ttl_s: int) -> None:
        self._client = aioredis.from_url(uri, socket_timeout=2, socket_connect_timeout=2)
        self._ttl_s = ttl_s

    @staticmethod
    def _name(scope: str, key: str) -> str:
        digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        return f"tenantserve:idempotency:{digest}"

    async def claim(self, scope: str, key: str, fingerprint: str) -> StoredAnswer | None:
        name = self._name(scope, key)
        claim = orjson.dumps({"fingerprint": fingerprint})
        for _ in range(3):  # the holder may expire between our SET and our GET
            if await self._client.set(name, claim, nx=True, ex=min(IN_FLIGHT_TTL_S, self._ttl_s)):
                return None
            held = await self._client.get(name)
            if held is not None:
                data = orjson.loads(held)
                return StoredAnswer(
                    data["fingerprint"],
                    data.get("status_code"),
                    data.get("content_type"),
                    data.get("body", "").encode("latin-1"),
                )
        raise RuntimeError("idempotency key changing hands too fast")  # pragma: no cover

    async def save(self, scope: str, key: str, answer: StoredAnswer) -> None:
        value = {
            "fingerprint": answer.fingerprint,
            "status_code": answer.status_code,
            "content_type": answer.content_type,
            "body": answer.body.decode("latin-1"),
        }
        await self._client.set(self._name(scope, key), orjson.dumps(value), ex=self._ttl_s)

    async def release(self, scope: str, key: str) -> None:
        await self._client.delete(self._name(scope, key))

    async def close(self) -> None:
        await self._client.aclose()


class DatabaseIdempotencyStore:
    """Rows keyed (scope, key); expired ones purged at most once a minute per worker."""

    def __init__(self, engine: Engine, *, ttl_s: int) -> None:
        self._engine = engine
        self._ttl = timedelta(seconds=ttl_s)
        self._in_flight = timedelta(seconds=min(IN_FLIGHT_TTL_S, ttl_s))
        self._purged_at = 0.0

    def _claim(self, scope: str, key: str, fingerprint: str) -> StoredAnswer | None:
        now = datetime.now(UTC)
        if time.monotonic() - self._purged_at > _PURGE_EVERY_S:
            self._purged_at = time.monotonic()
            with unit_of_work(self._engine) as session:
                expired = col(IdempotencyRecord.expires_at) <= now
                session.exec(delete(IdempotencyRecord).where(expired))
        for _ in range(3):  # a racing worker may insert, or its claim expire, meanwhile
            try:
                with unit_of_work(self._engine) as session:
                    row = session.get(IdempotencyRecord, (scope, key))
                    if row is not None and row.expires_at > now:
                        return StoredAnswer(
                            row.fingerprint, row.status_code, row.content_type, row.body or b""
                        )
                    if row is not None:
                        session.delete(row)
                        session.flush()
                    session.add(
                        IdempotencyRecord(
                            scope=scope, key=key, fingerprint=fingerprint,
                            expires_at=now + self._in_flight,
                        )
                    )  # fmt: skip
                return None
            except IntegrityError:
                continue
        raise RuntimeError("idempotency key changing hands too fast")  # pragma: no cover

    def _save(self, scope: str, key: str, answer: StoredAnswer) -> None:
        with unit_of_work(self._engine) as session:
            row = session.get(IdempotencyRecord, (scope, key))
            expires_at = datetime.now(UTC) + self._ttl
            if row is None:
                row = IdempotencyRecord(
                    scope=scope, key=key, fingerprint=answer.fingerprint, expires_at=expires_at
                )
            row.status_code, row.content_type = answer.status_code, answer.content_type
            row.body, row.expires_at = answer.body, expires_at
            session.add(row)

    def _release(self, scope: str, key: str) -> None:
        with unit_of_work(self._engine) as session:
            row = session.get(IdempotencyRecord, (scope, key))
            if row is not None:
                session.delete(row)

    async def claim(self, scope: str, key: str, fingerprint: str) -> StoredAnswer | None:
        return await asyncio.to_thread(self._claim, scope, key, fingerprint)

    async def save(self, scope: str, key: str, answer: StoredAnswer) -> None:
        await asyncio.to_thread(self._save, scope, key, answer)

    async def release(self, scope: str, key: str) -> None:
        await asyncio.to_thread(self._release, scope, key)

    async def close(self) -> None:
        return None


def make_store(storage_uri: str, engine: Engine, *, ttl_s: int) -> IdempotencyStore:
    if storage_uri.startswith("redis"):
        return RedisIdempotencyStore(storage_uri, ttl_s=ttl_s)
    return DatabaseIdempotencyStore(engine, ttl_s=ttl_s)
