"""Liveness, readiness and metrics: public, never limited, never metered."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy import text

from service import metrics
from service.api.dependencies import ResourcesDep
from service.resources import Resources

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


def _database_ok(resources: Resources) -> bool:
    with resources.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return True


# HEAD as well: uptime monitors probe with it, and a 405 reads to them as the service down.
# Out of the OpenAPI document, as HEAD usually is: it is the GET without its body (RFC 9110).
@router.head("/health", include_in_schema=False)
@router.get("/health", response_model=Health)
async def health() -> Health:
    return Health()


@router.head("/ready", include_in_schema=False)
@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency is down"}},
)
async def ready(resources: ResourcesDep) -> Response:
    body = await readiness(resources)
    return Response(
        body.model_dump_json(),
        status_code=200 if body.status == "ready" else 503,
        media_type="application/json",
    )


async def readiness(resources: Resources) -> Readiness:
    """What `/ready` (and the Open Inference Protocol's ready route) report."""
    try:
        database = await asyncio.wait_for(asyncio.to_thread(_database_ok, resources), timeout=3)
    except Exception:
        database = False
    limiter_ok = await resources.limiter.ping()
    checks = {
        "model": f"ok ({resources.models.current.version})",
        "database": "ok" if database else "unreachable",
        # Down shared storage degrades limits to per-process ones; serving goes on.
        "rate_limit_storage": resources.limiter.status if limiter_ok else "degraded",
    }
    # A version some tenant needs that this worker could not load: its tenants get 503.
    checks.update({f"model {v}": "refused" for v in resources.models.refused})
    strict_down = resources.settings.rate_limit_strict and not limiter_ok
    if resources.draining:
        checks["shutdown"] = "draining"
    status = "ready" if database and not strict_down and not resources.draining else "not_ready"
    return Readiness(status=status, checks=checks)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus_metrics(resources: ResourcesDep) -> Response:
    # Gauges of state, refreshed when scraped: the answering worker's as of now.
    metrics.USAGE_QUEUE.set(resources.usage.depth)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
