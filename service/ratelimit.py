"""Per-key moving-window rate limits and per-tenant monthly quotas.

NOTE: we use `limits` directly rather than slowapi's decorator or middleware: slowapi's
middleware skips routes added through `include_router`, a limit raised from a dependency turns
into a 500, and `limits`' moving window needs two Redis round trips (hit, then window stats)
where the response headers need both. One Lua script below does hit + stats in a single round
trip on Redis; in-process we use `limits`' own moving window, which costs no I/O.

While Redis is unreachable each process limits with its own in-memory windows (or answers 503
with `rate_limit_strict`), logs one warning per outage, and tries Redis again every second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import structlog
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from service.errors import Overloaded

log = structlog.get_logger("tenantserve.ratelimit")
_RETRY_SHARED_AFTER_S = 1.0
_QUOTA_TTL_S = 40 * 86400
T = TypeVar("T")

# KEYS[1]: the key's hit times, newest first. ARGV: limit, window in seconds.
# Returns {allowed, hits in the window, seconds until the oldest of them leaves it}.
_MOVING_WINDOW_LUA = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local start = now - window
local nth = redis.call('LINDEX', KEYS[1], limit - 1)
local allowed = 1
if nth and tonumber(nth) > start then
  allowed = 0
else
  redis.call('LPUSH', KEYS[1], string.format('%.6f', now))
  redis.call('LTRIM', KEYS[1], 0, limit - 1)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
end
local low, high, last = 0, redis.call('LLEN', KEYS[1]) - 1, -1
while low <= high do
  local mid = math.floor((low + high) / 2)
  if tonumber(redis.call('LINDEX', KEYS[1], mid)) > start then
    last = mid
    low = mid + 1
  else
    high = mid - 1
  end
end
local reset = 0
if last >= 0 then
  reset = tonumber(redis.call('LINDEX', KEYS[1], last)) + window - now
end
return {allowed, last + 1, string.format('%.6f', reset)}
"""

# KEYS[1]: the tenant's month counter. ARGV: amount, quota. Returns -1 unseeded, 0 over, 1 ok.
_QUOTA_LUA = """
local used = redis.call('GET', KEYS[1])
if not used then return -1 end
if tonumber(used) + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
return 1
"""


@lru_cache(maxsize=1024)
def parse_limit(text: str) -> RateLimitItem:
    """`"600/minute"` → a limit; a ValueError that says what is wrong otherwise."""
    try:
        items = parse_many(text)
    except ValueError:
        items = []
    if len(items) != 1:
        raise ValueError(
            f"invalid rate limit {text!r}: use one '<count>/<period>', e.g. 600/minute"
        )
    return items[0]


@dataclass(frozen=True, slots=True)
class WindowState:
    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    """Seconds until the oldest hit in the window leaves it."""

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset_after))


QuotaSeed = Callable[[], Awaitable[int]]


class _LocalStore:
    """One process's windows and quota counters."""

    def __init__(self) -> None:
        self._windows = MovingWindowRateLimiter(MemoryStorage())
        self._quota_used: dict[str, int] = {}

    async def hit(self, key: str, item: RateLimitItem) -> WindowState:
        allowed = await self._windows.hit(item, key)
        reset_at, remaining = await self._windows.get_window_stats(item, key)
        return WindowState(
            allowed, item.amount, max(0, remaining), max(0.0, reset_at - time.time())
        )

    async def consume(self, key: str, amount: int, quota: int, seed: QuotaSeed) -> bool:
        if key not in self._quota_used:
            used = await seed()
            self._quota_used.setdefault(key, used)
        # No await between the check and the increment: atomic on the event loop.
        if self._quota_used[key] + amount > quota:
            return False
        self._quota_used[key] += amount
        return True

    async def refund(self, key: str, amount: int) -> None:
        if key in self._quota_used:
            self._quota_used[key] -= amount


class _RedisStore:
    def __init__(self, uri: str) -> None:
        self.client = aioredis.from_url(
            uri, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=0
        )
        self._window_script = self.client.register_script(_MOVING_WINDOW_LUA)
        self._quota_script = self.client.register_script(_QUOTA_LUA)

    async def hit(self, key: str, item: RateLimitItem) -> WindowState:
        allowed, hits, reset = await self._window_script(
            keys=[f"tenantserve:rl:{key}:{item.get_expiry()}"],
            args=[item.amount, item.get_expiry()],
        )
        return WindowState(bool(allowed), item.amount, item.amount - int(hits), float(reset))

    async def consume(self, key: str, amount: int, quota: int, seed: QuotaSeed) -> bool:
        redis_key = f"tenantserve:quota:{key}"
        outcome = await self._quota_script(keys=[redis_key], args=[amount, quota])
        if outcome == -1:
            await self.client.set(redis_key, await seed(), nx=True, ex=_QUOTA_TTL_S)
            outcome = await self._quota_script(keys=[redis_key], args=[amount, quota])
        return bool(outcome == 1)

    async def refund(self, key: str, amount: int) -> None:
        await self.client.decrby(f"tenantserve:quota:{key}", amount)


class RateLimiter:
    def __init__(self, storage_uri: str, *, strict: bool) -> None:
        self._local = _LocalStore()
        self._shared = _RedisStore(storage_uri) if storage_uri.startswith("redis") else None
        self._strict = strict
        self._outage_since: float | None = None
        self._retry_at = 0.0

    @property
    def status(self) -> str:
        if self._shared is None:
            return "memory"
        return "degraded" if self._outage_since is not None else "ok"

    async def hit(self, key: str, limit: str) -> WindowState:
        item = parse_limit(limit)
        return await self._call(lambda store: store.hit(key, item))

    async def consume_quota(self, key: str, amount: int, quota: int, seed: QuotaSeed) -> bool:
        return await self._call(lambda store: store.consume(key, amount, quota, seed))

    async def refund_quota(self, key: str, amount: int) -> None:
        await self._call(lambda store: store.refund(key, amount))

    async def _call(self, operation: Callable[[_LocalStore | _RedisStore], Awaitable[T]]) -> T:
        shared = self._shared
        if shared is not None and (
            self._outage_since is None or time.monotonic() >= self._retry_at
        ):
            try:
                result = await operation(shared)
            except (RedisError, OSError) as exc:
                self._enter_outage(exc)
            else:
                self._leave_outage()
                return result
        if shared is not None and self._strict:
            raise Overloaded("The shared rate-limit storage is unreachable; try again shortly.")
        return await operation(self._local)

    def _enter_outage(self, exc: Exception) -> None:
        self._retry_at = time.monotonic() + _RETRY_SHARED_AFTER_S
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "rate_limit_storage_unreachable",
                error=type(exc).__name__,
                fallback="overloaded" if self._strict else "per-process limits",
            )

    def _leave_outage(self) -> None:
        if self._outage_since is not None:
            log.warning(
                "rate_limit_storage_restored",
                outage_seconds=round(time.monotonic() - self._outage_since, 1),
            )
            self._outage_since = None

    async def ping(self) -> bool:
        """Readiness: is the shared storage reachable (always true in memory)?"""
        if self._shared is None:
            return True
        try:
            return bool(await self._shared.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.client.aclose()
