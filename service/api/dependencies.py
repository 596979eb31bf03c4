"""Who is calling, checked once per request: one gate for customers, one dependency per staff role.

Customer keys are checked in this order: the caller's address not over its failed
authentications → format (for a legacy key: a known id) → the worker's cache, else checksum and
tag, then the database → secret → not revoked → not expired → the key's rate limit → tenant active →
scope. Every failure before the limit is the same 401 and counts against the address, so a
caller learns nothing about which keys exist and cannot guess for long;
the limit comes before the 403s so that every answer after authentication carries the
rate-limit headers, as customers are promised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Annotated

import structlog
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, OAuth2PasswordBearer, SecurityScopes
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from auth import keys, tokens
from auth.principals import Customer, Staff
from service import metrics
from service.api.context import context_of
from service.limits.quota import held_reservation, quota_ask
from service.logging import anonymise_ip
from service.resources import Resources, get_resources, resources_of
from tenants.database import unit_of_work
from tenants.errors import (
    Forbidden,
    InvalidCredentials,
    MissingCredentials,
    NotReady,
    Overloaded,
    RateLimited,
    TenantSuspended,
)
from tenants.repository import KeyRecord, get_user, load_key_record

API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="A tenant's API key (`tsk_…`)."
)
_bearer = OAuth2PasswordBearer(
    tokenUrl="/v1/auth/token", auto_error=False, description="A staff JWT from /v1/auth/token."
)
# For routes that authenticate by direct calls: the OpenAPI security they declare.
API_KEY_SECURITY: list[dict[str, list[str]]] = [{API_KEY_HEADER.scheme_name: []}]
_KEY_CHALLENGE = {"WWW-Authenticate": 'APIKey header="X-API-Key"'}
_BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_DATABASE_DOWN = "The database is unreachable; try again shortly."
log = structlog.get_logger("tenantserve.auth")

ResourcesDep = Annotated[Resources, Depends(get_resources)]


def db_session(resources: ResourcesDep) -> Iterator[Session]:
    """The request's unit of work: committed when the route returns, rolled back if it raises."""
    with unit_of_work(resources.engine) as session:
        yield session


# scope="function": the commit happens before the response is sent, so a 2xx means committed.
DbSession = Annotated[Session, Depends(db_session, scope="function")]


# Customers


def _load_record(engine: Engine, key_id: str) -> KeyRecord | None:
    with unit_of_work(engine) as session:
        return load_key_record(session, key_id)


async def _verified_key(resources: Resources, token: str) -> tuple[KeyRecord, Customer]:
    pepper = resources.settings.api_key_pepper.get_secret_value()
    parsed = keys.parse(token)
    if parsed is None or (parsed.legacy and parsed.key_id not in resources.keys.legacy_ids):
        raise InvalidCredentials(headers=_KEY_CHALLENGE)  # no lookup: never issued
    key_id = parsed.key_id
    hit, record, customer = resources.keys.get(key_id)
    if not hit:
        # The tag before the database: an invented key costs no lookup. (A cached key needs no
        # tag check: `matches` below is the whole answer, and one HMAC instead of three.)
        if not keys.was_issued(token, pepper):
            raise InvalidCredentials(headers=_KEY_CHALLENGE)
        generation = resources.keys.generation

        async def lookup() -> tuple[KeyRecord | None, Customer | None]:
            # Cached within the lookup: a request that finds the key missing once this lookup
            # is over (before its waiters resume) finds it cached, not a reason for another.
            record = await asyncio.to_thread(_load_record, resources.engine, key_id)
            return record, resources.keys.put(key_id, record, generation=generation)

        try:
            record, customer = await resources.keys.lookups.run((key_id, generation), lookup)
        except SQLAlchemyError:
            raise NotReady(_DATABASE_DOWN) from None
    if record is None or customer is None or not keys.matches(token, record.key_hash, pepper):
        raise InvalidCredentials(headers=_KEY_CHALLENGE)
    now = time.time()
    if (record.revoked_at is not None and record.revoked_at <= now) or (
        record.expires_at is not None and record.expires_at <= now
    ):
        raise InvalidCredentials(headers=_KEY_CHALLENGE)
    return record, customer


async def _enforce_rate_limit(
    request: Request, resources: Resources, customer: Customer, reserve: int
) -> None:
    """The key's moving window, and `reserve` predictions of the month's quota if the window
    allows (or, with a quota, its count): one storage round trip; headers on every later
    response."""
    ask = quota_ask(customer, reserve, max_batch_size=resources.settings.max_batch_size)
    window, used, seen = await resources.limiter.admit(
        customer.rate_limit_key, customer.rate_limit, ask
    )
    context = context_of(request)
    context.rate_window = window
    context.quota_seen = seen
    if used is not None:
        context.quota = held_reservation(resources, customer, ask, used)
    if not window.allowed:
        metrics.REJECTIONS.labels("rate_limit").inc()
        raise RateLimited(
            f"Rate limit of {customer.rate_limit} exceeded for this key.",
            headers={"Retry-After": str(window.retry_after)},
        )


def _authorize(
    resources: Resources, record: KeyRecord, customer: Customer, scopes: Iterable[str]
) -> None:
    """May this key do this now: its tenant active, its scopes, room to meter the request."""
    if not record.tenant_active:
        raise TenantSuspended("This tenant is suspended; contact your administrator.")
    missing = [scope for scope in scopes if scope not in customer.scopes]
    if missing:
        raise Forbidden(f"This key lacks the scope {missing[0]!r}.")
    if resources.usage.is_full:
        raise Overloaded("Usage metering is backed up; try again shortly.")


async def admit_customer(
    request: Request,
    resources: Resources,
    api_key: str | None,
    scopes: Iterable[str],
    *,
    reserve: int = 0,
) -> Customer:
    """Authentication, then the key's limit (with `reserve` predictions of the quota, for a
    route that knows how many before reading its body), then tenant and scope."""
    if not api_key:
        raise MissingCredentials(
            "Send your API key in the X-API-Key header.", headers=_KEY_CHALLENGE
        )
    address = request.client.host if request.client else ""
    verdict = resources.auth_failures.check(address)
    if verdict.blocked:
        metrics.REJECTIONS.labels("auth_failures").inc()
        if verdict.first_in_window:
            log.warning("auth_failures_throttled", client=anonymise_ip(address or None))
        raise RateLimited(
            "Too many failed authentications from this address; wait before trying again.",
            headers={"Retry-After": str(verdict.retry_after)},
        )
    try:
        record, customer = await _verified_key(resources, api_key)
    except InvalidCredentials:
        resources.auth_failures.record(address)
        raise
    # From here on the request is the tenant's: it is metered whatever its outcome.
    context = context_of(request)
    context.customer = customer
    context.received_at = datetime.now(UTC)
    await _enforce_rate_limit(request, resources, customer, reserve)
    _authorize(resources, record, customer, scopes)
    return customer


_PREDICT_SCOPES = ("predict",)


async def predict_caller(request: Request, *, reserve: int = 0) -> tuple[Resources, Customer]:
    """The prediction routes' gate (`reserve`: see `admit_customer`).

    NOTE: called directly, not through `Depends`: on a route this hot FastAPI's dependency
    solver costs more than authentication and limiting together.
    """
    resources = resources_of(request)
    api_key = request.headers.get("x-api-key")
    customer = await admit_customer(request, resources, api_key, _PREDICT_SCOPES, reserve=reserve)
    return resources, customer


async def _customer_caller(
    request: Request,
    security: SecurityScopes,
    resources: ResourcesDep,
    api_key: Annotated[str | None, Security(API_KEY_HEADER)],
) -> Customer:
    return await admit_customer(request, resources, api_key, security.scopes)


UsageCaller = Annotated[Customer, Security(_customer_caller, scopes=["usage:read"])]
PredictCaller = Annotated[Customer, Security(_customer_caller, scopes=["predict"])]


# Staff


def _current_staff(engine: Engine, claims: tokens.TokenClaims) -> Staff | None:
    """The token's user as the database has it now: deleted or changed users lose access."""
    with unit_of_work(engine) as session:
        user = get_user(session, claims.subject)
        if user is None or user.role != claims.role or user.tenant_id != claims.tenant_id:
            return None
        return Staff(user.id, user.username, claims.role, user.tenant_id)  # type: ignore[arg-type]


async def _staff_caller(
    resources: ResourcesDep, token: Annotated[str | None, Depends(_bearer)]
) -> Staff:
    if not token:
        raise MissingCredentials(
            "Send a staff token: Authorization: Bearer <jwt>.", headers=_BEARER_CHALLENGE
        )
    secret = resources.settings.jwt_secret.get_secret_value()
    try:
        claims = tokens.decode(token, secret=secret)
    except tokens.InvalidToken:
        raise InvalidCredentials(headers=_BEARER_CHALLENGE) from None
    try:
        staff = await asyncio.to_thread(_current_staff, resources.engine, claims)
    except SQLAlchemyError:
        raise NotReady(_DATABASE_DOWN) from None
    if staff is None:
        raise InvalidCredentials(headers=_BEARER_CHALLENGE)
    return staff


async def _admin_caller(staff: Annotated[Staff, Depends(_staff_caller)]) -> Staff:
    if not staff.is_admin:
        raise Forbidden("Only an admin may do this.")
    return staff


AuditorCaller = Annotated[Staff, Depends(_staff_caller)]
AdminCaller = Annotated[Staff, Depends(_admin_caller)]
