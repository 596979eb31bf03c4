"""The application: `create_app` wires routes and middleware; the lifespan builds the rest.

Nothing — engine, model, limiter, background task — exists at import time: the lifespan makes
it, hands it to requests as one typed `AppState`, and takes it down in order on shutdown
(after uvicorn has drained in-flight requests): stop polling, write every usage record, close.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import structlog
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from auth.cache import KeyCache
from auth.passwords import hash_password
from service.config import Settings, get_settings
from service.errors import install_error_handlers
from service.logging import configure_logging
from service.middleware import RequestMiddleware
from service.ratelimit import RateLimiter
from service.routes import health, predict, testing
from service.serving.batcher import MicroBatcher
from service.serving.models import ModelHolder
from service.serving.registry import ModelError, list_versions, newest_version, read_manifest
from service.state import AppState
from service.sync import poll_changes
from tenants.database import make_engine, upgrade
from tenants.models import User
from tenants.repository import find_user, read_control
from tenants.routes import admin, audit, auth, usage
from tenants.usage import UsageRecorder

log = structlog.get_logger("tenantserve")


def ensure_bootstrap_admin(engine: Engine, settings: Settings) -> None:
    """Create the environment's platform admin once; safe when several workers race."""
    username, password = settings.bootstrap_admin_username, settings.bootstrap_admin_password
    if not username or password is None:
        return
    with Session(engine) as session:
        if find_user(session, username) is not None:
            return
        session.add(
            User(username=username, password_hash=hash_password(password.get_secret_value()),
                 role="admin", tenant_id=None)
        )  # fmt: skip
        try:
            session.commit()
            log.info("bootstrap_admin_created", username=username)
        except IntegrityError:
            session.rollback()  # another worker created it first


def startup_version(engine: Engine, settings: Settings) -> tuple[str, int]:
    """The version to serve (activated through the API, else configured, else newest)."""
    with Session(engine) as session:
        control = read_control(session)
    for candidate in (control.active_model_version, settings.model_version):
        if candidate:
            try:
                read_manifest(settings.model_dir, candidate)
                return candidate, control.auth_epoch
            except ModelError:
                log.error("model_version_missing", model_version=candidate)
    return newest_version(settings.model_dir), control.auth_epoch


def _build_state(settings: Settings) -> tuple[AppState, int]:
    engine = make_engine(settings.database_url)
    upgrade(engine)
    ensure_bootstrap_admin(engine, settings)
    version, epoch = startup_version(engine, settings)
    models = ModelHolder.load(settings.model_dir, version)
    state = AppState(
        settings=settings,
        engine=engine,
        limiter=RateLimiter(settings.rate_limit_storage_uri, strict=settings.rate_limit_strict),
        models=models,
        batcher=MicroBatcher(
            lambda: models.current,
            enabled=settings.microbatch_enabled,
            max_rows=settings.microbatch_max_rows,
            max_wait_us=settings.microbatch_max_wait_us,
        ),
        keys=KeyCache(),
        usage=UsageRecorder(
            engine,
            interval_s=settings.usage_flush_interval_ms / 1000,
            max_rows=settings.usage_flush_max_rows,
            max_queue=settings.usage_queue_max,
            spill_dir=settings.usage_spill_dir,
        ),
    )
    return state, epoch


async def _warm_previous_version(state: AppState) -> None:
    """Load the newest other version too, so activating it (or rolling back) is instant."""
    serving = state.models.current.version
    others = [m.version for m in list_versions(state.settings.model_dir) if m.version != serving]
    if others:
        try:
            await state.models.preload(others[-1])
        except ModelError as exc:
            log.error("model_refused", model_version=others[-1], error=str(exc))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    state, epoch = await asyncio.to_thread(_build_state, settings)
    app.state.tenantserve = state
    state.usage.start()
    poller = asyncio.create_task(poll_changes(state, initial_epoch=epoch), name="state-poller")
    warmer = asyncio.create_task(_warm_previous_version(state), name="model-warmer")
    log.info("started", model_version=state.models.current.version, env=settings.env)
    try:
        yield
    finally:
        for task in (poller, warmer):
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await state.usage.close()
        state.batcher.close()
        await state.limiter.close()
        state.engine.dispose()
        log.info("stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    app = FastAPI(
        title="tenantserve",
        version="0.1.0",
        summary="A secured, multi-tenant prediction API for the iris classifier.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    for router in (
        health.router,
        predict.router,
        usage.router,
        auth.router,
        admin.router,
        audit.router,
    ):
        app.include_router(router)
    if settings.env == "test":
        app.include_router(testing.router)  # fails on purpose; never outside tests
    app.add_middleware(RequestMiddleware, settings=settings)
    return app
