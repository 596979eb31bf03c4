"""The tenant's monthly quota: predictions reserved before the model runs, returned if unserved."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

from auth.principals import Customer
from service import metrics
from service.resources import Resources
from tenants.database import unit_of_work
from tenants.errors import QuotaExceeded
from tenants.usage.queries import predictions_since
from tenants.usage.records import current_month


class QuotaReservation:
    """Predictions reserved against the tenant's month; given back if they are not served."""

    def __init__(
        self, resources: Resources, key: str, amount: int, *, remaining: int | None = None
    ) -> None:
        self._resources, self._key, self.amount = resources, key, amount
        self.remaining = remaining
        """The month's quota left once this is served (None: the tenant has no quota)."""

    async def release(self) -> None:
        if self.amount:
            await self._resources.limiter.refund_quota(self._key, self.amount)


def _written_predictions(resources: Resources, tenant_id: str, since: datetime) -> int:
    with unit_of_work(resources.engine) as session:
        return predictions_since(session, tenant_id, since)


async def reserve_quota(resources: Resources, customer: Customer, amount: int) -> QuotaReservation:
    """Atomically count `amount` predictions, or 429 if the month's quota cannot hold them."""
    quota = customer.monthly_quota
    if quota is None:
        return QuotaReservation(resources, "", 0)
    now = time.time()
    month = current_month(now)
    key = f"{customer.tenant_id}:{month.label}"

    async def used_so_far() -> int:
        queued = resources.usage.pending_items(customer.tenant_id)
        written = await asyncio.to_thread(
            _written_predictions, resources, customer.tenant_id, month.start
        )
        return written + queued

    used = await resources.limiter.consume_quota(key, amount, quota, used_so_far)
    if used is None:
        metrics.REJECTIONS.labels("quota").inc()
        retry_after = max(1, int(month.seconds_left(now)))
        raise QuotaExceeded(
            f"This tenant's monthly quota of {quota} predictions would be exceeded.",
            headers={"Retry-After": str(retry_after)},
        )
    return QuotaReservation(resources, key, amount, remaining=max(0, quota - used))
