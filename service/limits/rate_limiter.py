"""Per-key moving-window rate limits and per-tenant monthly quotas.

NOTE: we use `limits` directly rather than slowapi's decorator or middleware: slowapi's
middleware skips routes added through `include_router`, a limit raised from a dependency turns
into a 500, and `limits`' moving window needs two Redis round trips (hit, then window stats)
where the response headers need both. One Lua script below does hit + stats in a single round
trip on Redis; in-process windows are ours too (see `_LocalWindow`). `limits` parses and
validates the limit strings (`tenants.rate_limits`).

While Redis is unreachable each process limits with its own in-memory windows (or answers 503
with `rate_limit_strict`), logs one warning per outage, and tries Redis again every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import hiredis
import structlog
from limits import RateLimitItem
from redis import asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from service.single_flight import SingleFlight
from tenants.errors import Overloaded
from tenants.rate_limits import parse_limit

log = structlog.get_logger("tenantserve.ratelimit")
_RETRY_SHARED_AFTER_S = 1.0
_QUOTA_TTL_S = 40 * 86400
_MAX_LOCAL_WINDOWS = 100_000
T = TypeVar("T")
Call = TypeVar("Call")

# Month counters in a script: `peek` answers a counter's count (-1: unseeded); `reserve` adds
# `amount` to it unless that would pass `quota`, answering -1 (unseeded: nothing added), -2
# (over: nothing added) or the count after adding (the remaining quota for the response headers,
# without a round trip). A counter is read once a call and added to once, by what its requests
# took together (`write_counters`).
_COUNTERS_LUA = """
local used, first, counters = {}, {}, {}
local function peek(counter)
  if used[counter] == nil then
    used[counter] = tonumber(redis.call('GET', counter)) or false
    first[counter] = used[counter]
    counters[#counters + 1] = counter
  end
  return used[counter] or -1
end
local function reserve(counter, amount, quota)
  local count = peek(counter)
  if count < 0 then
    return -1
  end
  if count + amount > quota then
    return -2
  end
  used[counter] = count + amount
  return used[counter]
end
local function write_counters()
  for _, counter in ipairs(counters) do
    if used[counter] and used[counter] > first[counter] then
      redis.call('INCRBY', counter, used[counter] - first[counter])
    end
  end
end
"""

# KEYS: one window hash per hit, in arrival order (a key may repeat: its hits apply in order),
# then a month counter for each hit of a tenant with a quota. ARGV[1]: the number of hits; then
# each hit's limit and window in seconds; then for each counter its hit (1-based), the amount to
# reserve (0: none) and the quota. Returns one {allowed, hits in the window, microseconds until
# the oldest of them leaves it, reserved, seen} per hit. Each hash is `_LocalWindow` in Redis:
# field = slice index (1/200 of the window), value = hits in it; field `n` = their sum, `o` =
# the oldest slice that holds hits (or the current one), `e` = the newest slice whose hits the
# key's expiry outlives. A slice counts until all of it has left the window, so counts err
# high, never low, and a hash never holds more than 201 slices whatever the limit. Dropping old
# slices walks each index once: O(1) amortised per hit.
# A hit the window allows also reserves from its counter (`reserved`: what `reserve` answers,
# or -3 when nothing was asked or the window said no): a quota'd prediction's limit and quota
# in one round trip. `seen` is the counter's count before that (-1: unseeded or no counter):
# every response of a quota'd tenant says what is left, without a round trip of its own.
# NOTE: a hash is read once a call and written once, however many of the call's hits are its
# own (a busy key has many), and a `redis.call` costs Redis ~1.5 µs besides the command: one
# HMGET and one HSET a key, an expiry only when a slice begins, the oldest slice looked for
# only after slices were dropped; the reset an integer, not a formatted string: 78 → 59 µs of
# Redis's time for a call of 20 hits over 8 keys.
_SLICED_WINDOW_LUA = (
    _COUNTERS_LUA
    + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local n = tonumber(ARGV[1])
local asks = {}
for j = 1, #KEYS - n do
  asks[tonumber(ARGV[2 * n + 3 * j - 1])] = j
end
local windows, order, results = {}, {}, {}
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[2 * i])
  local w = windows[key]
  if not w then
    local window = tonumber(ARGV[2 * i + 1])
    local slice = window / 200
    local current = math.floor(now / slice)
    local field = string.format('%d', current)
    local state = redis.call('HMGET', key, 'n', 'o', 'e', field)
    local hits = tonumber(state[1]) or 0
    local oldest = tonumber(state[2]) or current
    local dropped = false
    while hits > 0 and oldest < current - 200 do
      local old = string.format('%d', oldest)
      hits = hits - (tonumber(redis.call('HGET', key, old)) or 0)
      redis.call('HDEL', key, old)
      oldest = oldest + 1
      dropped = true
    end
    while dropped and hits > 0 and redis.call('HEXISTS', key, string.format('%d', oldest)) == 0 do
      oldest = oldest + 1
    end
    if hits <= 0 then
      hits = 0
      oldest = current
    end
    w = {window = window, slice = slice, current = current, field = field, hits = hits,
         oldest = oldest, covered = tonumber(state[3]) or -1, in_current = tonumber(state[4]) or 0,
         added = 0}
    windows[key] = w
    order[#order + 1] = key
  end
  local allowed = 0
  if w.hits < limit then
    w.hits = w.hits + 1
    w.added = w.added + 1
    allowed = 1
  end
  local reset = 0
  -- at most a window: its hits did arrive by now (the slice's end is where counting errs high)
  if w.hits > 0 then
    reset = math.min(w.window, math.max(0, (w.oldest + 1) * w.slice + w.window - now))
  end
  local reserved, seen = -3, -1
  local j = asks[i]
  if j then
    local at = 2 * n + 3 * j
    local amount = tonumber(ARGV[at])
    seen = peek(KEYS[n + j])
    if allowed == 1 and amount > 0 then
      reserved = reserve(KEYS[n + j], amount, tonumber(ARGV[at + 1]))
    end
  end
  results[i] = {allowed, w.hits, math.floor(reset * 1000000), reserved, seen}
end
for _, key in ipairs(order) do
  local w = windows[key]
  local oldest = string.format('%d', w.oldest)
  if w.added == 0 then
    redis.call('HSET', key, 'n', w.hits, 'o', oldest)
  elseif w.covered >= w.current then
    redis.call('HSET', key, 'n', w.hits, 'o', oldest, w.field, w.in_current + w.added)
  else
    -- A slice begins: from now on, the key outlives every hit it can hold in it (after the
    -- write, which makes the key when it is new).
    redis.call('HSET', key, 'n', w.hits, 'o', oldest, w.field, w.in_current + w.added, 'e', w.field)
    redis.call('PEXPIRE', key, math.ceil((w.window + w.slice) * 1000))
  end
end
write_counters()
return results
"""
)

# KEYS: the tenants' month counters, one per request (a counter may repeat: in order). ARGV:
# amount and quota for each. Returns what `reserve` answers for each.
_QUOTA_LUA = (
    _COUNTERS_LUA
    + """
local results = {}
for i, counter in ipairs(KEYS) do
  results[i] = reserve(counter, tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]))
end
write_counters()
return results
"""
)
_UNSEEDED = -1


def _script_sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class WindowState:
    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    """Seconds until the oldest hit in the window leaves it."""

    @classmethod
    def after(cls, *, allowed: bool, limit: int, hits: int, reset_after: float) -> WindowState:
        """The state once `hits` are in the window. Hits counted under a higher limit stay in
        the window after it is lowered (an admin's change) and can outnumber the new limit:
        then nothing remains, never less."""
        return cls(allowed, limit, max(0, limit - hits), reset_after)

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset_after))


QuotaSeed = Callable[[], Awaitable[int]]
"""The month's count so far, from the database: what an unseeded quota counter starts at."""


@dataclass(frozen=True, slots=True)
class QuotaAsk:
    """`amount` predictions (0: none, only its count) of the month counter `key`, unless its
    count would pass `quota`."""

    key: str
    amount: int
    quota: int


class Admission(NamedTuple):
    """A window hit's outcome, and what the month counter asked with it said."""

    window: WindowState
    reserved: int | None
    """The count after the reservation asked (None: nothing reserved, because nothing was
    asked, the window said no, the counter is unseeded or the quota would be passed;
    `consume_quota` then settles it)."""
    seen: int | None
    """The count before it (None: no counter asked, or one not seeded yet)."""


class _LocalWindow:
    """One key's moving window in this process, as hit counts per time slice.

    NOTE: `limits`' in-memory moving window keeps one list entry per hit and inserts at the
    front: O(limit) per hit, which took a worker from ~2,000 to ~400 requests/s at a limit of a
    million a minute. Slices of 1/200 of the window make each hit O(1) amortised. A slice
    counts until all of it has left the window, so counts err high, never low: the limit is
    never exceeded in any window, at worst a request is refused 0.5% of a window early.
    """

    __slots__ = ("hits", "slice_length", "slices")

    def __init__(self, window: float) -> None:
        self.slice_length = window / 200
        self.slices: deque[list[float]] = deque()  # [slice start, hits], oldest first
        self.hits = 0

    def hit(self, limit: int, window: float, now: float) -> WindowState:
        slices = self.slices
        while slices and slices[0][0] + self.slice_length <= now - window:
            self.hits -= int(slices.popleft()[1])
        allowed = self.hits < limit
        if allowed:
            start = now - now % self.slice_length
            if slices and slices[-1][0] == start:
                slices[-1][1] += 1
            else:
                slices.append([start, 1.0])
            self.hits += 1
        # At most a window, as in Redis: the oldest hit arrived by now, wherever its slice ends.
        reset = slices[0][0] + self.slice_length + window - now if slices else 0.0
        return WindowState.after(
            allowed=allowed, limit=limit, hits=self.hits, reset_after=min(window, max(0.0, reset))
        )


class _LocalStore:
    """One process's windows and quota counters."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, int], _LocalWindow] = {}
        self._quota_used: dict[str, int] = {}
        self._seeds: SingleFlight[str, None] = SingleFlight()

    async def hit(self, key: str, item: RateLimitItem, quota: QuotaAsk | None) -> Admission:
        window, now = item.get_expiry(), time.monotonic()
        state = self._windows.get((key, window))
        if state is None:
            if len(self._windows) >= _MAX_LOCAL_WINDOWS:  # e.g. sign-ins with made-up names
                self._forget_idle(now)
            state = self._windows[(key, window)] = _LocalWindow(window)
        answer = state.hit(item.amount, window, now)
        seen = None if quota is None else self._quota_used.get(quota.key)
        if quota is None or not quota.amount or not answer.allowed or seen is None:
            return Admission(answer, None, seen)
        return Admission(answer, self._reserve(quota.key, quota.amount, quota.quota), seen)

    def _forget_idle(self, now: float) -> None:
        for (key, window), state in list(self._windows.items()):
            if not state.slices or state.slices[-1][0] + state.slice_length <= now - window:
                del self._windows[(key, window)]

    async def consume(self, key: str, amount: int, quota: int, seed: QuotaSeed) -> int | None:
        if key not in self._quota_used:

            async def seed_counter() -> None:
                self._quota_used.setdefault(key, await seed())

            await self._seeds.run(key, seed_counter)
        return self._reserve(key, amount, quota)

    def _reserve(self, key: str, amount: int, quota: int) -> int | None:
        # No await between the check and the increment: atomic on the event loop.
        if self._quota_used[key] + amount > quota:
            return None
        self._quota_used[key] += amount
        return self._quota_used[key]

    async def refund(self, key: str, amount: int) -> None:
        if key in self._quota_used:
            self._quota_used[key] -= amount

    def forget_quotas(self) -> list[str]:
        """Drop the quota counters (seeded for an outage); the keys they were for."""
        keys = list(self._quota_used)
        self._quota_used.clear()
        return keys


class _GatheredCalls(Generic[Call]):
    """Calls of one Redis script, gathered: the calls made while one round trip is in flight
    wait for the next and go together as one script call, as the model's micro-batch.
    `arrange` makes the script's keys and numbers of the calls, in arrival order; the script
    answers each in that order.

    NOTE: a round trip through redis-py costs ~150 µs of this process's CPU, more than the rest
    of a prediction; its pool, retries and connection checks ~70 µs of that. The calls go on a
    connection of their own, past the pool, one at a time; anything wrong falls back to the
    client's own path (with its retries, reloading the script if Redis lost it).

    NOTE: that connection has no socket timeout of its own, only one on reading the answer.
    redis-py bounds a write by running it in a task of its own under `asyncio.wait_for`: two
    turns of the loop before the call even left (~350 µs under load, of a ~1.3 ms round trip),
    and a task, for a write that cannot block: one call is in flight at a time, and its few
    hundred bytes fit the socket's buffer.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        script: str,
        arrange: Callable[[list[Call]], tuple[list[str], list[int]]],
    ) -> None:
        self._client = client
        self._script = script
        self._arrange = arrange
        self._sha = _script_sha(script)
        pool = client.connection_pool
        self._read_timeout = pool.connection_kwargs.get("socket_timeout")
        self._connection = pool.connection_class(
            **{**pool.connection_kwargs, "socket_timeout": None}
        )
        self._waiting: list[tuple[Call, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def call(self, arguments: Call) -> Any:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((arguments, answer))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_waiting())
        return await answer

    async def _send_waiting(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            try:
                results = await self._run(*self._arrange([arguments for arguments, _ in group]))
            except Exception as exc:
                results = [exc] * len(group)
            for (_, answer), result in zip(group, results, strict=True):
                if answer.done():
                    continue
                if isinstance(result, Exception):
                    answer.set_exception(result)
                else:
                    answer.set_result(result)

    async def _run(self, keys: list[str], args: list[int]) -> list[Any]:
        connection = self._connection
        try:
            # Packed by hiredis in C: redis-py's own packer, in Python, took ~2 µs a call.
            command = ("EVALSHA", self._sha, len(keys), *keys, *args)
            packed = hiredis.pack_command(command)  # type: ignore[arg-type]  # stub: a 1-tuple
            await connection.send_packed_command(packed)
            return list(await connection.read_response(timeout=self._read_timeout))
        except BaseException as exc:
            # Mid-command (cancelled, refused, timed out, no script): its state is unknown.
            await connection.disconnect()
            if not isinstance(exc, (RedisError, OSError)):
                raise
        try:
            results = await self._client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted or flushed its scripts
            await self._client.script_load(self._script)
            results = await self._client.evalsha(self._sha, len(keys), *keys, *args)
        return list(results)

    async def close(self) -> None:
        await self._connection.disconnect()


_Hit = tuple[str, int, int, QuotaAsk | None]
"""A window script call: the window's hash, its limit and seconds, and what to reserve."""
_Reservation = tuple[str, int, int]
"""A quota script call: the month counter, the amount and the quota."""


def _arrange_hits(hits: list[_Hit]) -> tuple[list[str], list[int]]:
    """`_SLICED_WINDOW_LUA`'s keys and numbers for `hits`."""
    keys = [window for window, _, _, _ in hits]
    numbers = [len(hits), *(n for _, limit, seconds, _ in hits for n in (limit, seconds))]
    for index, (_, _, _, quota) in enumerate(hits, start=1):
        if quota is not None:
            keys.append(_counter(quota.key))
            numbers += (index, quota.amount, quota.quota)
    return keys, numbers


def _arrange_reservations(reservations: list[_Reservation]) -> tuple[list[str], list[int]]:
    """`_QUOTA_LUA`'s keys and numbers for `reservations`."""
    keys = [counter for counter, _, _ in reservations]
    return keys, [number for _, amount, quota in reservations for number in (amount, quota)]


def _counter(key: str) -> str:
    return f"tenantserve:quota:{key}"


class _RedisStore:
    """Shared windows and quotas in Redis: each a script call per gathered group of requests."""

    def __init__(self, uri: str) -> None:
        self.client = aioredis.from_url(
            uri, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=0
        )
        self._windows = _GatheredCalls[_Hit](self.client, _SLICED_WINDOW_LUA, _arrange_hits)
        self._quotas = _GatheredCalls[_Reservation](self.client, _QUOTA_LUA, _arrange_reservations)
        self._seeds: SingleFlight[str, None] = SingleFlight()

    async def hit(self, key: str, item: RateLimitItem, quota: QuotaAsk | None) -> Admission:
        window = item.get_expiry()
        allowed, hits, reset, reserved, seen = await self._windows.call(
            (f"tenantserve:rlh:{key}:{window}", item.amount, window, quota)
        )
        state = WindowState.after(
            allowed=bool(allowed), limit=item.amount, hits=int(hits), reset_after=reset / 1e6
        )
        return Admission(
            state, int(reserved) if reserved >= 0 else None, int(seen) if seen >= 0 else None
        )

    async def close(self) -> None:
        await self._windows.close()
        await self._quotas.close()
        await self.client.aclose()

    async def consume(self, key: str, amount: int, quota: int, seed: QuotaSeed) -> int | None:
        redis_key = _counter(key)
        outcome = await self._quotas.call((redis_key, amount, quota))
        if outcome == _UNSEEDED:

            async def seed_counter() -> None:
                # NX: another process may have seeded it meanwhile, and been counted since.
                await self.client.set(redis_key, await seed(), nx=True, ex=_QUOTA_TTL_S)

            await self._seeds.run(redis_key, seed_counter)
            outcome = await self._quotas.call((redis_key, amount, quota))
        return int(outcome) if outcome >= 0 else None

    async def refund(self, key: str, amount: int) -> None:
        await self.client.decrby(_counter(key), amount)

    async def forget_quotas(self, keys: list[str]) -> None:
        """Unseed these counters: the next request counts them again from the database."""
        if keys:
            await self.client.delete(*(_counter(key) for key in keys))


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
        return (await self.admit(key, limit)).window

    async def admit(self, key: str, limit: str, quota: QuotaAsk | None = None) -> Admission:
        """A hit of `key`'s window and, if the window allows it, the reservation `quota` asks
        for, in the same round trip."""
        item = parse_limit(limit)
        return await self._call(lambda store: store.hit(key, item, quota))

    async def consume_quota(self, key: str, amount: int, quota: int, seed: QuotaSeed) -> int | None:
        """The month's count with `amount` added, or None (and nothing added) if over `quota`."""
        return await self._call(lambda store: store.consume(key, amount, quota, seed))

    async def refund_quota(self, key: str, amount: int) -> None:
        """Give back a reservation. Never refused: a refund strict mode cannot take to Redis is
        lost (the month counts `amount` more) rather than failing an answer already decided."""
        with contextlib.suppress(Overloaded):
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
                if self._outage_since is not None:
                    await self._leave_outage(shared, self._outage_since)
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

    async def _leave_outage(self, shared: _RedisStore, since: float) -> None:
        log.warning(
            "rate_limit_storage_restored", outage_seconds=round(time.monotonic() - since, 1)
        )
        self._outage_since = None
        # Predictions this process counted meanwhile are missing from Redis's counters, and its
        # own counters go stale from now on: Redis counts again from the database (where they
        # land within a flush interval), and the next outage seeds afresh.
        with contextlib.suppress(RedisError, OSError):
            await shared.forget_quotas(self._local.forget_quotas())

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
            await self._shared.close()
