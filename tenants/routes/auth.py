"""`POST /v1/auth/token`: staff sign-in (OAuth2 password form) → a short-lived JWT."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm
from sqlmodel import Session

from auth import tokens
from auth.dependencies import State
from auth.passwords import verify_password
from service import metrics
from service.errors import InvalidCredentials, RateLimited, ValidationFailed, error_responses
from service.logging import anonymise_ip
from service.state import AppState
from tenants import audit
from tenants.repository import find_user
from tenants.schemas import TokenResponse

router = APIRouter(prefix="/v1/auth", tags=["auth"])


async def _throttle(request: Request, state: AppState, username: str) -> None:
    """Per username and per client address: guessing passwords gets slow, then audited."""
    client = request.client.host if request.client else "unknown"
    for subject in (f"signin:user:{username.lower()}", f"signin:ip:{client}"):
        window = await state.limiter.hit(subject, state.settings.signin_rate_limit)
        if not window.allowed:
            metrics.REJECTIONS.labels("signin").inc()
            await asyncio.to_thread(
                _record, state, request, username, "signin.locked_out",
                {"client": anonymise_ip(client), "retry_after": window.retry_after},
            )  # fmt: skip
            raise RateLimited(
                "Too many sign-in attempts; wait before trying again.",
                headers={"Retry-After": str(window.retry_after)},
            )


def _record(
    state: AppState, request: Request, username: str, action: str, details: dict[str, object]
) -> None:
    with Session(state.engine) as session:
        audit.record(
            session, actor=username[:100], action=action, target=username[:200],
            tenant_id=None, request_id=request.state.request_id, details=details,
        )  # fmt: skip
        session.commit()


@router.post(
    "/token",
    response_model=TokenResponse,
    responses=error_responses(InvalidCredentials, ValidationFailed, RateLimited),
)
async def sign_in(
    request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()], state: State
) -> TokenResponse:
    await _throttle(request, state, form.username)

    def check() -> TokenResponse | None:
        with Session(state.engine) as session:
            user = find_user(session, form.username)
            if not verify_password(form.password, user.password_hash if user else None):
                return None
            assert user is not None
            ttl = state.settings.jwt_ttl_seconds
            token = tokens.issue(
                subject=user.id, role=user.role, tenant_id=user.tenant_id,
                secret=state.settings.jwt_secret.get_secret_value(), ttl_seconds=ttl,
            )  # fmt: skip
            return TokenResponse(access_token=token, expires_in=ttl)

    answer = await asyncio.to_thread(check)
    if answer is None:
        await asyncio.to_thread(_record, state, request, form.username, "signin.failed", {})
        raise InvalidCredentials(
            "Wrong username or password.", headers={"WWW-Authenticate": "Bearer"}
        )
    return answer
