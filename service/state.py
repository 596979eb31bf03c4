"""What the lifespan builds and every request uses: one typed object, no import-time globals."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from starlette.requests import HTTPConnection

from auth.cache import KeyCache
from service.config import Settings
from service.ratelimit import RateLimiter
from service.serving.batcher import MicroBatcher
from service.serving.models import ModelHolder
from tenants.usage import UsageRecorder


@dataclass(slots=True)
class AppState:
    settings: Settings
    engine: Engine
    limiter: RateLimiter
    models: ModelHolder
    batcher: MicroBatcher
    keys: KeyCache
    usage: UsageRecorder
    database_ok: bool = True


async def app_state(connection: HTTPConnection) -> AppState:
    # async: FastAPI would run a plain `def` dependency in the thread pool on every request.
    state: AppState = connection.app.state.tenantserve
    return state
