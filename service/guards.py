"""Limits a customer request passes before any model work: the key's rate, the tenant's quota."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import SecurityScopes
from sqlmodel import Session

from auth.dependencies import API_KEY_HEADER, State, authenticate_key, authorize
from auth.principals import Customer
from service import metrics
from service.errors import QuotaExceeded, RateLimited
from service.state import AppState
from tenants.usage_queries import predictions_since


async def enforce_rate_limit(request: Request, state: AppState, customer: Customer) -> None:
    """The key's moving window: one storage round trip; headers on every later response."""
    window = await state.limiter.hit(customer.rate_limit_key, customer.rate_limit)
    request.state.rate_window = window
    if not window.allowed:
        metrics.REJECTIONS.labels("rate_limit").inc()
        raise RateLimited(
            f"Rate limit of {customer.rate_limit} exceeded for this key.",
            headers={"Retry-After": str(window.retry_after)},
        )


async def admit_customer(
    request: Request, state: AppState, api_key: str | None, scopes: Iterable[str]
) -> Customer:
    """Authentication, then the key's limit, then tenant and scope.

    The limit comes before the 403s so that every answer after authentication carries the
    rate-limit headers, as customers are promised.
    """
    record, customer = await authenticate_key(request, state, api_key)
    await enforce_rate_limit(request, state, customer)
    authorize(state, record, customer, scopes)
    return customer


async def predict_caller(request: Request) -> tuple[AppState, Customer]:
    """The prediction routes' gate.

    NOTE: called directly, not through `Depends`: on a route this hot FastAPI's dependency
    solver costs more than authentication and limiting together.
    """
    state: AppState = request.app.state.tenantserve
    api_key = request.headers.get("x-api-key")
    return state, await admit_customer(request, state, api_key, _PREDICT_SCOPES)


async def usage_caller(
    request: Request,
    security: SecurityScopes,
    state: State,
    api_key: Annotated[str | None, Security(API_KEY_HEADER)],
) -> Customer:
    return await admit_customer(request, state, api_key, security.scopes)


_PREDICT_SCOPES = ("predict",)
UsageCaller = Annotated[Customer, Security(usage_caller, scopes=["usage:read"])]


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime) -> datetime:
    start = month_start(now)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


class QuotaReservation:
    """Predictions reserved against the tenant's month; given back if they are not served."""

    def __init__(self, state: AppState, key: str, amount: int) -> None:
        self._state, self._key, self.amount = state, key, amount

    async def release(self) -> None:
        if self.amount:
            await self._state.limiter.refund_quota(self._key, self.amount)


async def reserve_quota(state: AppState, customer: Customer, amount: int) -> QuotaReservation:
    """Atomically count `amount` predictions, or 429 if the month's quota cannot hold them."""
    quota = customer.monthly_quota
    if quota is None:
        return QuotaReservation(state, "", 0)
    now = datetime.now(UTC)
    key = f"{customer.tenant_id}:{now:%Y-%m}"

    async def used_so_far() -> int:
        def count() -> int:
            with Session(state.engine) as session:
                return predictions_since(session, customer.tenant_id, month_start(now))

        queued = sum(
            int(r["items"]) for r in state.usage.pending() if r["tenant_id"] == customer.tenant_id
        )
        return await asyncio.to_thread(count) + queued

    if not await state.limiter.consume_quota(key, amount, quota, used_so_far):
        metrics.REJECTIONS.labels("quota").inc()
        retry_after = max(1, int((next_month_start(now) - now).total_seconds()))
        raise QuotaExceeded(
            f"This tenant's monthly quota of {quota} predictions would be exceeded.",
            headers={"Retry-After": str(retry_after)},
        )
    return QuotaReservation(state, key, amount)
