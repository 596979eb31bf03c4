"""The one typed object a request carries from the middleware to the route and back.

The middleware creates it; authentication, the limiter and the route fill it in; when the
response starts the middleware reads it to build the usage record, and after it the log
line. Nothing else travels in `request.state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from starlette.requests import HTTPConnection
from starlette.types import Message, Scope, Send

from auth.principals import Customer
from service.limits.quota import QuotaReservation
from service.limits.rate_limiter import WindowState
from tenants.ids import fast_id
from tenants.usage.records import UsageEntry

_SCOPE_KEY = "tenantserve.context"


class AnswerRelay(Protocol):
    """Sees the answer on its way out (an `Idempotency-Key` claim keeps it for retries)."""

    async def relay(self, message: Message, send: Send) -> None: ...

    async def abandon(self) -> None: ...


@dataclass(slots=True)
class RequestContext:
    request_id: str
    received_at: datetime | None = None
    """When the request was authenticated as a customer's: from then on it is metered."""
    customer: Customer | None = None
    rate_window: WindowState | None = None
    items: int = 0
    """Predictions served."""
    quota: QuotaReservation | None = None
    """What this request reserved of the tenant's monthly quota (a single prediction's from its
    admission on): given back if it serves no prediction, or its answer cannot be sent."""
    quota_seen: int | None = None
    """The month's count at admission, before any reservation of this request's (None: the
    tenant has no quota, or its counter is not seeded yet)."""
    model_version: str | None = None
    features: list[list[float]] | None = None
    """Only kept when `TENANTSERVE_LOG_FEATURES` is on."""
    replay: bool = False
    """The answer is an earlier one, repeated for a retried `Idempotency-Key`."""
    idempotency: AnswerRelay | None = None

    @property
    def quota_remaining(self) -> int | None:
        """The tenant's monthly quota left, for the headers: after this request's reservation if
        it holds one, else as its admission saw it."""
        if self.quota is not None and self.quota.remaining is not None:
            return self.quota.remaining
        if self.quota_seen is None or self.customer is None:
            return None
        quota = self.customer.monthly_quota
        return None if quota is None else max(0, quota - self.quota_seen)

    def attach(self, scope: Scope) -> None:
        scope[_SCOPE_KEY] = self

    def usage_entry(
        self, *, method: str, path: str, status_code: int, latency_ms: float
    ) -> UsageEntry | None:
        """The request's usage record, if it was a customer's; else None."""
        if self.customer is None or self.received_at is None:
            return None
        return UsageEntry(
            id=fast_id(),
            at=self.received_at,
            request_id=self.request_id,
            tenant_id=self.customer.tenant_id,
            key_id=self.customer.key_id,
            method=method,
            path=path[:200],
            status_code=status_code,
            items=self.items,
            latency_ms=latency_ms,
            model_version=self.model_version,
            replay=self.replay,
        )


def context_of(connection: HTTPConnection) -> RequestContext:
    """The context the middleware attached (a blank one outside it, e.g. in a unit test)."""
    context = connection.scope.get(_SCOPE_KEY)
    if context is None:
        context = RequestContext(request_id=fast_id())
        context.attach(connection.scope)
    assert isinstance(context, RequestContext)
    return context
