"""CPU per request of the ASGI app alone: `python -m perf.app_cost`.

No server and no network between the load and the app: one process runs the app (lifespan
and all: SQLite, the Redis limiter when Redis answers, the journal, the model thread) and
calls it directly with `--concurrency` requests in flight on uvloop. The process's CPU time
(every thread) over `--requests` requests, divided by them, is what the app costs a request,
without uvicorn's parsing and writing. It moves less with other work on the machine than the
benchmark's requests/s, so it is the figure to compare a change by; the bare FastAPI app of
`perf/bare_app.py` is measured the same way as the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import uvloop
from starlette.types import ASGIApp, Message

from perf import servers
from service.config import Settings
from service.main import create_app
from service.serving.training import ensure_default_versions

IRIS = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
ADMIN = ("perf-admin", "a long perf admin password")


def _scope(path: str, body: bytes, key: str) -> dict[str, Any]:
    headers = [
        (b"host", b"perf"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"x-api-key", key.encode()),
    ]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000), "state": {},
    }  # fmt: skip


async def _drive(
    app: ASGIApp, path: str, body: bytes, key: str, *, requests: int, concurrency: int
) -> Counter[int]:
    statuses: Counter[int] = Counter()
    never = asyncio.Event()

    async def one() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            if messages:
                return messages.pop()
            await never.wait()  # no disconnect: the app reads the body once
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] += 1

        await app(_scope(path, body, key), receive, send)

    async def caller(count: int) -> None:
        for _ in range(count):
            await one()

    await asyncio.gather(*(caller(requests // concurrency) for _ in range(concurrency)))
    return statuses


async def _provision(app: ASGIApp, max_batch_size: int, *, quota: bool) -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://perf") as client:
        signed_in = await client.post(
            "/v1/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]}
        )
        headers = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
        tenant = await client.post(
            "/v1/admin/tenants",
            json={"name": "app-cost", "rate_limit": "1000000000/minute",
                  "max_batch_size": max_batch_size, "monthly_quota": 2**31 - 1 if quota else None},
            headers=headers,
        )  # fmt: skip
        key = await client.post(
            f"/v1/admin/tenants/{tenant.json()['id']}/keys", json={"name": "k"}, headers=headers
        )
        return str(key.json()["key"])


async def _measure(args: argparse.Namespace) -> tuple[float, Counter[int]]:
    path, body = "/v1/predict", json.dumps(IRIS).encode()
    if args.batch:
        path, body = "/v1/predict/batch", json.dumps({"items": [IRIS] * args.batch}).encode()
    if args.bare:
        from perf.bare_app import app as bare

        app: ASGIApp = bare
        return await _timed(app, path, body, "unused", args)
    scratch = Path(tempfile.mkdtemp(prefix="tenantserve-app-cost-"))
    ensure_default_versions(scratch / "models")
    limiter = "redis://127.0.0.1:6379/14" if servers.redis_answers() else "memory://"
    settings = Settings(
        _env_file=None, env="development", database_url=f"sqlite:///{scratch / 'a.db'}",
        model_dir=scratch / "models", model_version=args.version, rate_limit_storage_uri=limiter,
        usage_journal_dir=scratch / "journal", bootstrap_admin_username=ADMIN[0],
        bootstrap_admin_password=ADMIN[1], log_level=args.log_level,
        usage_durability=args.durability,
        # Every run signs in once, and perf.compare runs two a round: not a guess to slow down.
        signin_rate_limit="100000/minute", signin_address_rate_limit="100000/minute",
    )  # fmt: skip
    tenantserve = create_app(settings)
    async with tenantserve.router.lifespan_context(tenantserve):
        key = await _provision(tenantserve, max(args.batch, 1), quota=args.quota)
        return await _timed(tenantserve, path, body, key, args)


async def _timed(
    app: ASGIApp, path: str, body: bytes, key: str, args: argparse.Namespace
) -> tuple[float, Counter[int]]:
    await _drive(app, path, body, key, requests=2000, concurrency=args.concurrency)  # warm up
    cpu = time.process_time()
    statuses = await _drive(
        app, path, body, key, requests=args.requests, concurrency=args.concurrency
    )
    return (time.process_time() - cpu) / sum(statuses.values()) * 1e6, statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.app_cost", description=__doc__)
    parser.add_argument(
        "--bare", action="store_true", help="the bare FastAPI app instead (single predictions)"
    )
    parser.add_argument("--version", default="v2-logreg", choices=["v1-forest", "v2-logreg"])
    parser.add_argument("--batch", type=int, default=0, help="items a batch (0: single)")
    parser.add_argument("--requests", type=int, default=20000)
    # One part switched off at a time: WARNING drops the request line, write-behind the journal.
    parser.add_argument("--log-level", default="INFO", choices=["INFO", "WARNING"])
    parser.add_argument(
        "--durability", default="journal", choices=["journal", "written", "write-behind"]
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--quota", action="store_true", help="the tenant has a monthly quota (never reached)"
    )
    args = parser.parse_args(argv)
    # The request log goes to a file, as a server's would, not to this terminal.
    log = tempfile.NamedTemporaryFile(prefix="tenantserve-app-cost-", suffix=".log")  # noqa: SIM115
    os.dup2(log.fileno(), sys.stdout.fileno())
    cpu_us, statuses = uvloop.run(_measure(args))
    what = "bare FastAPI" if args.bare else f"tenantserve {args.version}"
    shape = f"batch of {args.batch}" if args.batch else "single"
    print(f"{what}, {shape}: {cpu_us:.1f} µs of CPU a request, statuses {dict(statuses)}",
          file=sys.stderr)  # fmt: skip
    return 0 if set(statuses) == {200} else 1


if __name__ == "__main__":
    raise SystemExit(main())
