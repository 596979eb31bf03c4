"""The application: `create_app` wires routes and middleware; the lifespan builds the rest.

Nothing — engine, model, limiter, background task — exists at import time: the lifespan makes
it, hands it to requests as one typed `Resources`, and takes it down in order on shutdown
(after uvicorn has drained in-flight requests): stop watching, write every usage record, close.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from importlib import metadata

import structlog
from fastapi import FastAPI
from fastapi.routing import APIRoute
from slowapi.errors import RateLimitExceeded
from starlette.types import ASGIApp

from service.api.exact_routes import ExactRoutes
from service.api.idempotency import install_replay_handler
from service.api.key_cache import KeyCache
from service.api.middleware import RequestMiddleware
from service.api.problems import install_error_handlers
from service.api.routes import admin, audit, health, inference_v2, predict, signin, usage
from service.changes import watch_changes
from service.config import Settings, get_settings
from service.drain import delay_shutdown
from service.idempotency_store import make_store
from service.limits.auth_failures import AuthFailures
from service.limits.rate_limiter import RateLimiter
from service.logging import configure_logging
from service.resources import Resources
from service.serving import routes as model_routes
from service.serving.batcher import MicroBatcher
from service.serving.holder import ModelHolder
from service.serving.registry import ModelError, list_versions
from service.startup import ensure_bootstrap_admin, startup_version
from service.telemetry import telemetry_config
from tenants.background import background_threads
from tenants.database import make_engine, unit_of_work, upgrade
from tenants.repository import unrevoked_key_ids
from tenants.usage.recorder import UsageRecorder

log = structlog.get_logger("tenantserve")


def _build_resources(settings: Settings) -> Resources:
    engine = make_engine(settings.database_url)
    upgrade(engine)
    passwords = settings.password_hasher()
    ensure_bootstrap_admin(engine, settings, passwords)
    version = startup_version(engine, settings)
    models = ModelHolder.load(
        settings.model_dir,
        version,
        max_loaded=settings.model_max_loaded,
        intra_op_threads=settings.model_intra_op_threads,
    )
    with unit_of_work(engine) as session:
        legacy_ids = unrevoked_key_ids(session)
    resources = Resources(
        settings=settings,
        engine=engine,
        limiter=RateLimiter(settings.rate_limit_storage_uri, strict=settings.rate_limit_strict),
        models=models,
        batcher=MicroBatcher(
            enabled=settings.microbatch_enabled,
            max_rows=settings.microbatch_max_rows,
            max_wait_us=settings.microbatch_max_wait_us,
        ),
        keys=KeyCache(legacy_ids=legacy_ids),
        usage=UsageRecorder(
            engine,
            interval_s=settings.usage_flush_interval_ms / 1000,
            max_rows=settings.usage_flush_max_rows,
            max_queue=settings.usage_queue_max,
            journal_dir=settings.usage_journal_dir,
            durability=settings.usage_durability,
        ),
        passwords=passwords,
        idempotency=make_store(
            settings.rate_limit_storage_uri, engine, ttl_s=settings.idempotency_ttl_s
        ),
        auth_failures=AuthFailures(settings.auth_failure_limit),
    )
    return resources


async def _warm_previous_version(resources: Resources) -> None:
    """Load the newest other version too, so activating it (or rolling back) is instant."""
    serving = resources.models.current.version
    model_dir = resources.settings.model_dir
    others = [m.version for m in list_versions(model_dir) if m.version != serving]
    if others:
        try:
            await resources.models.preload(others[-1])
        except ModelError as exc:
            log.error("model_refused", model_version=others[-1], error=str(exc))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Database work off the loop (usage writes, key lookups) runs in these.
    asyncio.get_running_loop().set_default_executor(background_threads("blocking"))
    resources = await asyncio.to_thread(_build_resources, settings)
    app.state.resources = resources
    delay_shutdown(resources, settings.shutdown_delay_s)
    resources.usage.start()
    watcher = asyncio.create_task(watch_changes(resources), name="change-watcher")
    warmer = asyncio.create_task(_warm_previous_version(resources), name="model-warmer")
    _settle_garbage_collector()
    log.info("started", model_version=resources.models.current.version, env=settings.env)
    try:
        yield
    finally:
        for task in (watcher, warmer):
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await resources.usage.close()
        resources.batcher.close()
        await resources.limiter.close()
        await resources.idempotency.close()
        resources.engine.dispose()
        log.info("stopped")


GEN0_THRESHOLD = 50_000
"""Allocations between young-generation collections (CPython's default: 700).

NOTE: a request allocates a few hundred objects, so at the default a gen-0 collection ran every
couple of requests, and every tenth a gen-1 one, walking what start-up left behind.
"""


def _settle_garbage_collector() -> None:
    """Start-up's objects (models, modules, settings) live for good: stop scanning them."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


class TenantServe(FastAPI):
    """FastAPI with the request middleware outermost, around FastAPI's own error and body-limit
    layers: so even their answers (a 413 for a declared oversize body) get a request id, the
    contract's problem+json and a log line. Just inside it, the prediction routes are taken
    out of FastAPI's stack (see `service.api.exact_routes`)."""

    hot_routes: Sequence[APIRoute] = ()

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        hot = ExactRoutes(
            super().build_middleware_stack(),
            self.hot_routes,
            max_body_size=settings.max_body_bytes,
            exception_handlers=self.exception_handlers,
        )
        return RequestMiddleware(hot, settings=settings)


def create_app(settings: Settings | None = None) -> TenantServe:
    settings = settings or get_settings()
    configure_logging(settings)
    app = TenantServe(
        title="tenantserve",
        version=metadata.version("tenantserve"),  # pyproject.toml's, as installed
        summary="A secured, multi-tenant prediction API for the iris classifier.",
        lifespan=lifespan,
        telemetry=telemetry_config(settings),
        max_body_size=settings.max_body_bytes,
    )
    app.state.settings = settings
    install_error_handlers(app)
    install_replay_handler(app)
    signin_limiter = signin.address_limiter(settings)
    app.add_exception_handler(RateLimitExceeded, signin.address_throttled(signin_limiter))
    predict_router = predict.build_router(settings)
    for router in (
        health.router,
        predict_router,
        inference_v2.router,
        usage.router,
        signin.build_router(settings, signin_limiter),
        admin.router,
        model_routes.router,
        audit.router,
    ):
        app.include_router(router)
    app.hot_routes = [route for route in predict_router.routes if isinstance(route, APIRoute)]
    return app
