"""What the lifespan builds and every request uses: one typed object, no import-time globals."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from starlette.requests import HTTPConnection

from auth.passwords import PasswordHasher
from service.api.key_cache import KeyCache
from service.config import Settings
from service.idempotency_store import IdempotencyStore
from service.limits.auth_failures import AuthFailures
from service.limits.rate_limiter import RateLimiter
from service.serving.batcher import MicroBatcher
from service.serving.holder import ModelHolder
from tenants.usage.recorder import UsageRecorder


@dataclass(slots=True)
class Resources:
    settings: Settings
    engine: Engine
    limiter: RateLimiter
    models: ModelHolder
    batcher: MicroBatcher
    keys: KeyCache
    usage: UsageRecorder
    passwords: PasswordHasher
    idempotency: IdempotencyStore
    auth_failures: AuthFailures
    draining: bool = False
    """Set on SIGTERM: readiness fails at once, serving goes on for the shutdown delay."""
    database_ok: bool = True
    """As last seen by the change watcher: False while the database is unreachable."""


async def get_resources(connection: HTTPConnection) -> Resources:
    # async: FastAPI would run a plain `def` dependency in the thread pool on every request.
    return resources_of(connection)


def resources_of(connection: HTTPConnection) -> Resources:
    resources: Resources = connection.app.state.resources
    return resources
