"""`GET /v1/usage`: a tenant's own totals for a period, and where its monthly quota stands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from auth.principals import Customer
from service.api.dependencies import DbSession, ResourcesDep, UsageCaller
from service.api.problems import error_responses
from tenants.errors import (
    Forbidden,
    InvalidCredentials,
    MissingCredentials,
    RateLimited,
    ValidationFailed,
)
from tenants.schemas import UtcMoment
from tenants.usage.queries import UsageFilter, predictions_since, totals
from tenants.usage.records import month_start

router = APIRouter(tags=["usage"])


class Quota(BaseModel):
    monthly_limit: int | None
    used: int
    remaining: int | None


class TenantUsage(BaseModel):
    tenant_id: str
    requests: int
    predictions: int
    errors: int
    quota: Quota


async def _own_writes_written(customer: UsageCaller, resources: ResourcesDep) -> Customer:
    """The caller, once every usage record this worker has answered is in the database.

    Read-your-writes: records are written behind, so without this `quota.used` lagged the
    quota counter by a flush. Flushing rather than adding this worker's queue to the database's
    totals keeps every answer a database read: never a record counted twice (one committed but
    not yet dequeued), and never a smaller count from one worker after a larger one from another.
    A worker knows only its own queue, so with several workers a record answered by another
    worker within its flush interval (200 ms) can still be missing; a client's keep-alive
    connection stays with one worker, so its own sequence of requests reads its writes.
    """
    # False when the database refused the write: the read below then answers or fails alike.
    await resources.usage.written_through()
    return customer


@router.get(
    "/v1/usage",
    response_model=TenantUsage,
    responses=error_responses(
        MissingCredentials, InvalidCredentials, Forbidden, ValidationFailed, RateLimited
    ),
)
def own_usage(
    customer: Annotated[Customer, Depends(_own_writes_written)],
    session: DbSession,
    start: Annotated[
        UtcMoment | None, Query(alias="from", description="default: month start")
    ] = None,
    end: Annotated[UtcMoment | None, Query(alias="to")] = None,
) -> TenantUsage:
    this_month = month_start(datetime.now(UTC))
    period = UsageFilter(tenant_id=customer.tenant_id, start=start or this_month, end=end)
    requests, predictions, errors = totals(session, period)
    used = predictions_since(session, customer.tenant_id, this_month)
    limit = customer.monthly_quota
    remaining = None if limit is None else max(0, limit - used)
    return TenantUsage(
        tenant_id=customer.tenant_id, requests=requests, predictions=predictions,
        errors=errors, quota=Quota(monthly_limit=limit, used=used, remaining=remaining),
    )  # fmt: skip
