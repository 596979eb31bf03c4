"""`GET /v1/usage`: a tenant's own totals for a period, and where its monthly quota stands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from service.api.dependencies import DbSession, UsageCaller
from service.api.problems import error_responses
from tenants.errors import (
    Forbidden,
    InvalidCredentials,
    MissingCredentials,
    RateLimited,
    ValidationFailed,
)
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


@router.get(
    "/v1/usage",
    response_model=TenantUsage,
    responses=error_responses(
        MissingCredentials, InvalidCredentials, Forbidden, ValidationFailed, RateLimited
    ),
)
def own_usage(
    customer: UsageCaller,
    session: DbSession,
    start: Annotated[
        datetime | None, Query(alias="from", description="default: month start")
    ] = None,
    end: Annotated[datetime | None, Query(alias="to")] = None,
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
