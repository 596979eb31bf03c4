"""The IETF rate-limit fields (draft-ietf-httpapi-ratelimit-headers), as structured fields.

`RateLimit-Policy: "key";q=600;w=60, "quota";q=100000` says what the limits are;
`RateLimit: "key";r=599;t=59, "quota";r=99990;t=1234567` says where the caller stands. The
`"quota"` policy is listed whenever the tenant has a monthly quota, and so is its `RateLimit`
item once the month's counter exists: what is left after this request's reservation if it
holds one, else what its rate limit's script call read (no round trip of its own). 401s carry
neither: no tenant is known.
"""

from __future__ import annotations

import math
import time

from auth.principals import Customer
from service.limits.rate_limiter import WindowState
from tenants.rate_limits import parse_limit
from tenants.usage.records import current_month


def ratelimit_fields(
    customer: Customer, window: WindowState, quota_remaining: int | None
) -> list[tuple[bytes, bytes]]:
    seconds = parse_limit(customer.rate_limit).get_expiry()
    policy = f'"key";q={window.limit};w={seconds}'
    # In-process windows count in slices, so their reset can pass the window by a fraction.
    reset = min(seconds, math.ceil(window.reset_after))
    state = f'"key";r={window.remaining};t={reset}'
    if customer.monthly_quota is not None:
        policy += f', "quota";q={customer.monthly_quota}'
        if quota_remaining is not None:
            now = time.time()
            until = math.ceil(current_month(now).seconds_left(now))
            state += f', "quota";r={quota_remaining};t={until}'
    return [(b"ratelimit-policy", policy.encode()), (b"ratelimit", state.encode())]
