"""The tenant's monthly quota: predictions reserved before the model runs, returned if unserved.

A single prediction's one is asked for with its key's rate-limit hit (`quota_ask`), in the same
round trip to the limiter's storage, before its body is even read: the request holds it from
then on, and gives it back if it ends without a prediction served (an invalid body, a 403, an
idempotent replay: see `service.api.middleware`). Where that reservation was not made (the
counter is unseeded, the month is near its quota), `reserve_quota` decides after validation, as
for a batch, whose amount is only known then.

NOTE: a hold is taken only while more than `HOLD_MARGIN` + the server's batch cap is left. A
held reservation that turns out unserved is counted until it is given back, and near the end of
the quota that could refuse a valid request that fits: there every request is decided after its
validation. For a wrong 429 now, the tenant itself would need over `HOLD_MARGIN` invalid
requests in flight at once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

from auth.principals import Customer
from service import metrics
from service.limits.rate_limiter import QuotaAsk
from service.resources import Resources
from tenants.database import unit_of_work
from tenants.errors import QuotaExceeded
from tenants.usage.queries import predictions_since
from tenants.usage.records import Month, current_month


class QuotaReservation:
    """Predictions reserved against the tenant's month; given back if they are not served."""

    def __init__(
        self, resources: Resources, key: str, amount: int, *, remaining: int | None = None
    ) -> None:
        self._resources, self._key, self.amount = resources, key, amount
        self.remaining = remaining
        """The month's quota left once this is served (None: the tenant has no quota)."""

    async def release(self) -> None:
        """Give the reservation back (once, however often this is called)."""
        amount, self.amount, self.remaining = self.amount, 0, None
        if amount:
            await self._resources.limiter.refund_quota(self._key, amount)


HOLD_MARGIN = 1024
"""With the server's batch cap, what must be left of a quota for a request to hold some."""


def quota_ask(customer: Customer, amount: int, *, max_batch_size: int) -> QuotaAsk | None:
    """What a request asks of the month's counter with its rate limit (None: the tenant has no
    quota): to hold `amount` predictions, granted only while more than the margin is left, or
    (`amount` 0, or a quota too small for the margin) only the count, for the headers."""
    quota = customer.monthly_quota
    if quota is None:
        return None
    key = _counter_key(customer, current_month(time.time()))
    holdable = quota - HOLD_MARGIN - max_batch_size
    if amount and holdable >= amount:
        return QuotaAsk(key, amount, holdable)
    return QuotaAsk(key, 0, quota)


def _counter_key(customer: Customer, month: Month) -> str:
    return f"{customer.tenant_id}:{month.label}"


def held_reservation(
    resources: Resources, customer: Customer, ask: QuotaAsk | None, used: int | None
) -> QuotaReservation | None:
    """What the limiter reserved with a window hit: the month's count `used` after it."""
    if ask is None or used is None or customer.monthly_quota is None:
        return None
    remaining = max(0, customer.monthly_quota - used)
    return QuotaReservation(resources, ask.key, ask.amount, remaining=remaining)


def _written_predictions(resources: Resources, tenant_id: str, since: datetime) -> int:
    with unit_of_work(resources.engine) as session:
        return predictions_since(session, tenant_id, since)


async def reserve_quota(
    resources: Resources, customer: Customer, amount: int, *, held: QuotaReservation | None
) -> QuotaReservation:
    """Atomically count `amount` predictions, or 429 if the month's quota cannot hold them;
    `held`, the request's reservation from its admission, when it is for as many."""
    if held is not None:
        if held.amount == amount:
            return held
        await held.release()  # not what this request turned out to need
    quota = customer.monthly_quota
    if quota is None:
        return QuotaReservation(resources, "", 0)
    now = time.time()
    month = current_month(now)
    key = _counter_key(customer, month)

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
