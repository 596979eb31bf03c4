"""`POST /v1/auth/token`: staff sign-in (OAuth2 password form) → a short-lived JWT.

Guessing is slowed twice. slowapi limits each client address at the door
(`TENANTSERVE_SIGNIN_ADDRESS_RATE_LIMIT`), with its own storage on the limiter's URI and an
in-memory fallback; it runs in the thread pool with the route, where its synchronous storage
calls cost the event loop nothing. Each username has its own limit on the shared limiter
(`TENANTSERVE_SIGNIN_RATE_LIMIT`), so a password spread over many addresses is still slow, and
each lock-out is an audit event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.security import OAuth2PasswordRequestForm
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from sqlmodel import Session
from starlette.responses import Response

from auth import tokens
from service import metrics
from service.api.context import context_of
from service.api.dependencies import DbSession, ResourcesDep
from service.api.problems import error_responses, problem_response
from service.config import Settings
from service.logging import anonymise_ip
from tenants import audit
from tenants.database import unit_of_work
from tenants.errors import InvalidCredentials, RateLimited, ValidationFailed
from tenants.repository import find_user
from tenants.schemas import NO_NUL, TokenResponse


def address_limiter(settings: Settings) -> Limiter:
    """slowapi's limiter for sign-in addresses, on the same storage as every other limit."""
    return Limiter(
        key_func=get_remote_address,
        storage_uri=settings.rate_limit_storage_uri,
        strategy="moving-window",
        key_prefix="tenantserve:signin",
        in_memory_fallback_enabled=True,
        headers_enabled=False,
    )


def _audit_attempt(
    session: Session, request: Request, username: str, action: str, details: dict[str, object]
) -> None:
    audit.record(
        session, actor=username[:100], action=action, target=username[:200], tenant_id=None,
        request_id=context_of(request).request_id, details=details,
    )  # fmt: skip


class SignInForm(OAuth2PasswordRequestForm):
    """The OAuth2 password form, its document saying what the server refuses: an empty
    username or password reaches no check (a form parser reads an empty field as a missing
    one), so the document asks for at least one character of each. `grant_type` is left out:
    OAuth2 clients send `password`, which is ignored like any other extra field, and a form
    field cannot be the null its schema allowed."""

    def __init__(
        self,
        *,
        username: Annotated[str, Form(min_length=1, pattern=NO_NUL)],
        password: Annotated[str, Form(min_length=1, json_schema_extra={"format": "password"})],
        scope: Annotated[str, Form()] = "",
    ) -> None:
        super().__init__(grant_type=None, username=username, password=password, scope=scope)


async def _unlocked_form(
    request: Request,
    form: Annotated[SignInForm, Depends()],
    resources: ResourcesDep,
) -> SignInForm:
    """The sign-in form, unless its username is locked out for now (an audited 429)."""
    subject = f"signin:user:{form.username.lower()}"
    window = await resources.limiter.hit(subject, resources.settings.signin_rate_limit)
    if not window.allowed:
        metrics.REJECTIONS.labels("signin").inc()
        client = request.client.host if request.client else None
        details: dict[str, object] = {
            "client": anonymise_ip(client), "retry_after": window.retry_after,
        }  # fmt: skip
        with unit_of_work(resources.engine) as session:
            _audit_attempt(session, request, form.username, "signin.locked_out", details)
        raise RateLimited(
            "Too many sign-in attempts; wait before trying again.",
            headers={"Retry-After": str(window.retry_after)},
        )
    return form


def build_router(settings: Settings, limiter: Limiter) -> APIRouter:
    router = APIRouter(prefix="/v1/auth", tags=["auth"])

    @router.post(
        "/token",
        response_model=TokenResponse,
        responses=error_responses(InvalidCredentials, ValidationFailed, RateLimited),
    )
    @limiter.limit(settings.signin_address_rate_limit)
    def sign_in(
        request: Request,
        form: Annotated[SignInForm, Depends(_unlocked_form)],
        resources: ResourcesDep,
        session: DbSession,
    ) -> TokenResponse:
        user = find_user(session, form.username)
        if not resources.passwords.verify(form.password, user.password_hash if user else None):
            # Its own unit of work: the failure is recorded although this request fails.
            with unit_of_work(resources.engine) as audit_session:
                _audit_attempt(audit_session, request, form.username, "signin.failed", {})
            raise InvalidCredentials(
                "Wrong username or password.", headers={"WWW-Authenticate": "Bearer"}
            )
        assert user is not None
        ttl = resources.settings.jwt_ttl_seconds
        token = tokens.issue(
            subject=user.id, role=user.role, tenant_id=user.tenant_id,
            secret=resources.settings.jwt_secret.get_secret_value(), ttl_seconds=ttl,
        )  # fmt: skip
        return TokenResponse(access_token=token, expires_in=ttl)

    return router


def address_throttled(limiter: Limiter) -> Callable[[Request, Exception], Awaitable[Response]]:
    """The handler for slowapi's 429: the contract's problem+json, with `Retry-After`."""

    async def handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RateLimitExceeded) and exc.limit is not None
        metrics.REJECTIONS.labels("signin").inc()
        # slowapi's own record of which limit and key it checked, as its default handler reads.
        _, identifiers = request.state.view_rate_limit
        reset_at, _ = limiter.limiter.get_window_stats(exc.limit.limit, *identifiers)
        retry_after = max(1, math.ceil(reset_at - time.time()))
        error = RateLimited(
            "Too many sign-in attempts from this address; wait before trying again.",
            headers={"Retry-After": str(retry_after)},
        )
        return problem_response(error, context_of(request).request_id)

    return handler
