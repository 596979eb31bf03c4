"""Redis state of one key's rate-limit window at a high limit: bounded, whatever the limit.

    python -m perf.redis_window_memory [--hits 100000] [--redis redis://127.0.0.1:6379/9]

Hits one key limited to 1,000,000/minute through the real limiter, in gathered groups as the
server sends them, then prints `MEMORY USAGE` of its hash.
"""

from __future__ import annotations

import argparse
import asyncio

import redis

from service.limits.rate_limiter import RateLimiter

LIMIT = "1000000/minute"


async def hit(uri: str, hits: int) -> None:
    limiter = RateLimiter(uri, strict=True)
    try:
        for _ in range(hits // 100):
            await asyncio.gather(*(limiter.hit("key:memory-probe", LIMIT) for _ in range(100)))
    finally:
        await limiter.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.redis_window_memory")
    parser.add_argument("--hits", type=int, default=100_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis)
    for key in client.scan_iter("tenantserve:rlh:key:memory-probe:*"):
        client.delete(key)
    asyncio.run(hit(args.redis, args.hits))
    [key] = list(client.scan_iter("tenantserve:rlh:key:memory-probe:*"))
    print(f"{args.hits} hits at {LIMIT}: MEMORY USAGE {client.memory_usage(key)} bytes, "
          f"{client.hlen(key)} hash fields")  # fmt: skip


if __name__ == "__main__":
    main()
