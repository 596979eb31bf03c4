"""A legitimate customer's requests/s alone, then under a flood of invented keys.

`python -m perf.flood`: one `tenantserve serve` (1 worker, SQLite, memory:// limiter) in a
scratch folder; the customer's closed-loop load (perf.loadgen: wrk when installed) from
127.0.0.1, and a paced flood of distinct invented keys — valid CRC, random ids, half of them
tagged under a wrong pepper, half in the untagged legacy format — from 127.0.0.2, a separate
process with its own connections. Three runs of the customer's load: alone; under the flood with
the default auth-failure limit (the flooding address is refused with 429 after its first
failures); under the flood with that limit lifted, so that every invented key is checked and
refused (401) — the cost of the key format alone. Prints requests/s, p99 and the ratio to alone
(target: >= 0.8). Bounded: a few seconds per run, loopback only, the server stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import secrets
import string
import tempfile
import time
import zlib
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from auth import keys as key_format
from perf import provision, servers
from perf.bench import IRIS
from perf.loadgen import LoadResult, Target, run_load

FLOOD_ADDRESS = "127.0.0.2"
_ALPHABET = string.digits + string.ascii_letters


def _legacy_key() -> str:
    """The untagged format of keys issued before tags: `tsk_<id>_<secret><6-char CRC-32>`."""
    body = f"tsk_{''.join(secrets.choice(_ALPHABET) for _ in range(12))}_"
    body += "".join(secrets.choice(_ALPHABET) for _ in range(32))
    value, digits = zlib.crc32(body.encode()), []
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits.append(_ALPHABET[digit])
    return body + "".join(reversed(digits))


def invented_keys(count: int) -> list[str]:
    wrong_pepper = secrets.token_urlsafe(32)
    return [
        _legacy_key() if n % 2 else key_format.generate(wrong_pepper).token for n in range(count)
    ]


@dataclass(frozen=True)
class FloodResult:
    sent: int
    seconds: float
    statuses: dict[int, int]

    @property
    def rps(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def _flood(port: int, keys: list[str], rate: float, seconds: float) -> FloodResult:
    """`rate` requests/s spread over connections from FLOOD_ADDRESS, each paced to its share."""
    connections = 16
    body = json.dumps(IRIS).encode()
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    deadline = started + seconds

    request_head = (
        "POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )

    async def one(first: int) -> None:
        interval = connections / rate
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(FLOOD_ADDRESS, 0)
        )
        index, due = first, time.monotonic()
        try:
            while due < deadline:
                key = keys[index % len(keys)]
                index += connections
                head = f"{request_head}X-API-Key: {key}\r\n\r\n"
                writer.write(head.encode() + body)
                answer = await reader.readuntil(b"\r\n\r\n")
                length = answer.lower().split(b"content-length:")[1].split(b"\r\n")[0]
                await reader.readexactly(int(length))
                statuses[int(answer[9:12])] += 1
                due += interval
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        finally:
            writer.close()

    await asyncio.wait_for(
        asyncio.gather(*(one(n) for n in range(connections))), timeout=seconds + 15
    )
    return FloodResult(sum(statuses.values()), time.monotonic() - started, dict(statuses))


def _flood_process(
    port: int, rate: float, seconds: float, queue: multiprocessing.Queue[FloodResult]
) -> None:
    keys = invented_keys(max(2000, int(rate * seconds)))  # distinct: none is sent twice
    queue.put(asyncio.run(_flood(port, keys, rate, seconds)))


def _customer_under_flood(
    target: Target, args: argparse.Namespace, *, rate: float
) -> tuple[LoadResult, FloodResult | None]:
    if not rate:
        return run_load(target, connections=args.connections, seconds=args.duration), None
    queue: multiprocessing.Queue[FloodResult] = multiprocessing.Queue()
    # Longer than the customer's run on both sides, so the whole of it is under the flood.
    flooder = multiprocessing.Process(
        target=_flood_process, args=(target.port, rate, args.duration + 2, queue)
    )
    flooder.start()
    time.sleep(1)
    try:
        result = run_load(target, connections=args.connections, seconds=args.duration)
        flood = queue.get(timeout=args.duration + 30)
    finally:
        flooder.join(timeout=5)
        if flooder.is_alive():
            flooder.kill()
    return result, flood


def _run(args: argparse.Namespace, scratch: Path, auth_failure_limit: str) -> list[str]:
    admin = ("perf-admin", secrets.token_urlsafe(24))
    env = servers.tenantserve_env(
        port=servers.free_port(),
        workers=1,
        database_url=f"sqlite:///{scratch / 'flood.db'}",
        limiter_uri="memory://",
        model_dir=args.model_dir or scratch / "models",
        admin=admin,
    )
    env["TENANTSERVE_AUTH_FAILURE_LIMIT"] = auth_failure_limit
    server = servers.start_tenantserve(env, log_path=scratch / "server.log", cwd=scratch)
    lines = []
    try:
        _tenant, customer = provision.provision(
            server.url, username=admin[0], password=admin[1], tenant="customer",
            keys=1, rate_limit="1000000000/minute", max_batch_size=10,
        )  # fmt: skip
        target = Target(server.port, "/v1/predict", json.dumps(IRIS).encode(), customer)
        run_load(target, connections=args.connections, seconds=2)  # warm-up, not counted
        alone, _ = _customer_under_flood(target, args, rate=0)
        flooded, flood = _customer_under_flood(target, args, rate=args.flood_rate)
        assert flood is not None
        ratio = flooded.rps / alone.rps if alone.rps else 0.0
        lines += [
            f"auth-failure limit {auth_failure_limit}:",
            f"  customer alone        {alone.rps:8.0f} requests/s  p99 {alone.p99_ms:6.1f} ms"
            f"  non-2xx {alone.non_2xx}",
            f"  customer under flood  {flooded.rps:8.0f} requests/s  p99 {flooded.p99_ms:6.1f} ms"
            f"  non-2xx {flooded.non_2xx}",
            f"  flood {flood.rps:.0f} requests/s of distinct invented keys from {FLOOD_ADDRESS},"
            f" answers {dict(sorted(flood.statuses.items()))}",
            f"  ratio {ratio:.2f} (target >= 0.8)",
        ]
    finally:
        servers.stop(server)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.flood", description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=16, help="the customer's")
    parser.add_argument("--flood-rate", type=float, default=1000.0, help="requests/s")
    parser.add_argument("--model-dir", type=Path, help="an existing registry (else trained)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tenantserve-flood-") as tmp:
        scratch = Path(tmp)
        if args.model_dir is None:
            args.model_dir = scratch / "models"  # trained by the first serve, reused by the next
        lines = [f"perf.flood {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, 1 worker, SQLite, memory://"]
        for limit in ("100/minute", "1000000000/minute"):
            with suppress(FileNotFoundError):
                (scratch / "flood.db").unlink()
            lines += _run(args, scratch, limit)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
