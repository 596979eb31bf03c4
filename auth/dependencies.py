"""One dependency per kind of caller; routes declare who may call them in their signature.

Customer keys are checked in this order: format and checksum → lookup (cache, else database)
→ secret → not revoked → not expired → tenant active → scope. Every failure before "tenant
active" is the same 401, so a caller learns nothing about which keys exist.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, OAuth2PasswordBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from auth import keys, tokens
from auth.principals import Customer, Staff
from service.errors import (
    Forbidden,
    InvalidCredentials,
    MissingCredentials,
    NotReady,
    Overloaded,
    TenantSuspended,
)
from service.state import AppState, app_state
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

State = Annotated[AppState, Depends(app_state)]


def _load_record(state: AppState, key_id: str) -> KeyRecord | None:
    with Session(state.engine) as session:
        return load_key_record(session, key_id)


async def _verified_key(state: AppState, token: str) -> tuple[KeyRecord, Customer]:
    key_id = keys.key_id_of(token)
    if key_id is None:
        raise InvalidCredentials(headers=_KEY_CHALLENGE)
    hit, record, customer = state.keys.get(key_id)
    if not hit:
        generation = state.keys.generation
        try:
            record = await asyncio.to_thread(_load_record, state, key_id)
        except SQLAlchemyError:
            raise NotReady("The database is unreachable; try again shortly.") from None
        customer = state.keys.put(key_id, record, generation=generation)
    pepper = state.settings.api_key_pepper.get_secret_value()
    if record is None or customer is None or not keys.matches(token, record.key_hash, pepper):
        raise InvalidCredentials(headers=_KEY_CHALLENGE)
    now = time.time()
    if (record.revoked_at is not None and record.revoked_at <= now) or (
        record.expires_at is not None and record.expires_at <= now
    ):
        raise InvalidCredentials(headers=_KEY_CHALLENGE)
    return record, customer


async def authenticate_key(
    request: Request, state: AppState, api_key: str | None
) -> tuple[KeyRecord, Customer]:
    """Who is calling: 401 unless the key is well-formed, known, unrevoked and unexpired."""
    if not api_key:
        raise MissingCredentials(
            "Send your API key in the X-API-Key header.", headers=_KEY_CHALLENGE
        )
    record, customer = await _verified_key(state, api_key)
    # From here on the request is the tenant's: it is metered whatever its outcome.
    request.state.customer = customer
    request.state.received_at = datetime.now(UTC)
    return record, customer


def authorize(
    state: AppState, record: KeyRecord, customer: Customer, scopes: Iterable[str]
) -> None:
    """May this key do this now: its tenant active, its scopes, room to meter the request."""
    if not record.tenant_active:
        raise TenantSuspended("This tenant is suspended; contact your administrator.")
    missing = [scope for scope in scopes if scope not in customer.scopes]
    if missing:
        raise Forbidden(f"This key lacks the scope {missing[0]!r}.")
    if state.usage.is_full:
        raise Overloaded("Usage metering is backed up; try again shortly.")


async def staff_caller(state: State, token: Annotated[str | None, Depends(_bearer)]) -> Staff:
    if not token:
        raise MissingCredentials(
            "Send a staff token: Authorization: Bearer <jwt>.", headers=_BEARER_CHALLENGE
        )
    try:
        claims = tokens.decode(token, secret=state.settings.jwt_secret.get_secret_value())
    except tokens.InvalidToken:
        raise InvalidCredentials(headers=_BEARER_CHALLENGE) from None

    def current_user() -> Staff | None:
        with Session(state.engine) as session:
            user = get_user(session, claims.subject)
            if user is None or user.role != claims.role or user.tenant_id != claims.tenant_id:
                return None
            return Staff(user.id, user.username, claims.role, user.tenant_id)  # type: ignore[arg-type]

    try:
        staff = await asyncio.to_thread(current_user)
    except SQLAlchemyError:
        raise NotReady("The database is unreachable; try again shortly.") from None
    if staff is None:
        raise InvalidCredentials(headers=_BEARER_CHALLENGE)
    return staff


async def admin_caller(staff: Annotated[Staff, Depends(staff_caller)]) -> Staff:
    if not staff.is_admin:
        raise Forbidden("Only an admin may do this.")
    return staff


AuditorCaller = Annotated[Staff, Depends(staff_caller)]
AdminCaller = Annotated[Staff, Depends(admin_caller)]
