"""How fast a revocation reaches another instance: from the admin's 200 to the first 401 there.

    python -m perf.propagation [--revocations 100] [--workers 2]

Two `tenantserve serve` instances share a fresh PostgreSQL database and Redis. Each key is used
on instance B (so B has it cached), revoked through instance A, then tried on B over a new
connection each time (any of B's workers may answer) until B refuses it. The safety poll is left
at its default (5 s): the figures are those of `LISTEN`/`NOTIFY`.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from perf import provision, servers

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
IRIS = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def _refused_after(fresh: httpx.Client, key: str, *, give_up_s: float) -> float:
    """Seconds from now until `fresh`'s instance first answers `key` with 401."""
    started = time.perf_counter()
    while time.perf_counter() - started < give_up_s:
        if fresh.post("/v1/predict", json=IRIS, headers={"X-API-Key": key}).status_code == 401:
            return time.perf_counter() - started
    raise RuntimeError(f"{fresh.base_url} still accepted a revoked key after {give_up_s} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.propagation", description=__doc__)
    parser.add_argument("--revocations", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="workers per instance")
    parser.add_argument("--database-url", default=PG_SERVER)
    args = parser.parse_args(argv)
    database = servers.fresh_postgres_database(args.database_url, "tenantserve_propagation")
    admin = ("perf-admin", secrets.token_urlsafe(24))
    with (
        tempfile.TemporaryDirectory(prefix="tenantserve-propagation-") as scratch,
        ExitStack() as stack,
    ):
        instances = []
        for name in ("a", "b"):
            env = servers.tenantserve_env(
                port=servers.free_port(), workers=args.workers, database_url=database,
                limiter_uri="redis://127.0.0.1:6379/13", model_dir=Path(scratch) / "models",
                admin=admin,
            )  # fmt: skip
            server = servers.start_tenantserve(
                env, log_path=Path(scratch) / f"{name}.log", cwd=Path(scratch)
            )
            stack.callback(servers.stop, server)
            instances.append(server.url)
        first, second = instances
        tenant_id, _ = provision.provision(
            first, username=admin[0], password=admin[1], tenant="propagation", keys=0
        )
        admin_client = stack.enter_context(httpx.Client(base_url=first, timeout=30))
        token = provision.admin_token(admin_client, *admin)
        admin_client.headers["Authorization"] = f"Bearer {token}"
        # No connection kept: each request is a new connection, so any of B's workers may answer.
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        fresh = stack.enter_context(httpx.Client(base_url=second, timeout=5, limits=no_reuse))
        seconds: list[float] = []
        for number in range(args.revocations):
            issued = provision.issue_key(admin_client, tenant_id=tenant_id, name=f"key-{number}")
            for _ in range(2 * args.workers):  # cached by B's workers, most likely all of them
                fresh.post("/v1/predict", json=IRIS, headers={"X-API-Key": issued["key"]})
            response = admin_client.post(f"/v1/admin/keys/{issued['id']}/revoke")
            response.raise_for_status()
            seconds.append(_refused_after(fresh, issued["key"], give_up_s=10))
    milliseconds = sorted(1000 * value for value in seconds)
    p99 = milliseconds[max(0, round(0.99 * len(milliseconds)) - 1)]
    print(
        f"revocation seen by another instance ({args.workers} workers each, "
        f"LISTEN/NOTIFY, {len(milliseconds)} revocations): "
        f"median {statistics.median(milliseconds):.0f} ms, p99 {p99:.0f} ms, "
        f"max {milliseconds[-1]:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
