"""A benchmark run: the bare FastAPI reference, then tenantserve fully secured, on the same cores.

    make bench                       # .venv/bin/python -m perf.bench
    python -m perf.bench --quick     # 3 s per scenario, a smoke test
    python -m perf.bench --rounds 3  # three whole runs, then each scenario's medians

The machine is shared and noisy (PERF_NOTES.md: ±30% between passes), so every figure is also
given as a ratio to the bare app measured minutes earlier in the same run. Everything listens on
127.0.0.1 only, and every server is stopped with SIGTERM. At the end tenantserve gets SIGTERM in
the middle of a short load, is restarted, and its usage records are counted against the requests.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from perf import provision, servers
from perf.loadgen import LoadResult, Target, run_load

VERSIONS = ("v1-forest", "v2-logreg")  # what `serve` trains into an empty model dir
BATCH_VERSION = "v2-logreg"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
IRIS = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
WARM_UP_SHARE = 0.2
"""Of a scenario's duration, the same load first, unmeasured: each row is the steady state,
not a cold start's caches, connections and first group commits (the first scenario's p99 was
3-4x the next ones')."""


@dataclass(frozen=True)
class Row:
    scenario: str
    items: int  # predictions per request
    result: LoadResult
    warm_up: LoadResult  # the unmeasured load before `result`: its answers count for usage
    server_cpu_us: float  # server CPU time per request, all its processes
    busiest_worker: float | None  # its share of the workers' CPU time: 0.5 is an even split of 2
    redis_cpu_us: float  # Redis's CPU time per request (the limiter's share of the cores)
    idle: float  # the share of the machine's CPU time left idle: near 0, the cores were the limit

    @property
    def predictions_per_second(self) -> float:
        ok = self.result.requests - self.result.non_2xx
        return ok * self.items / self.result.seconds if self.result.seconds else 0.0


@dataclass
class Usage:
    """What the generators saw, against what the server recorded."""

    counted: int = 0  # responses counted by the generators and the sanity checks
    uncounted_at_most: int = 0  # in flight when a generator stopped: maybe recorded, maybe not
    live: int | None = None  # records visible right after the last scenario
    after_restart: int | None = None  # records after SIGTERM and a restart
    clean_stop: bool | None = None


def _measure(
    scenario: str,
    items: int,
    server: servers.Server,
    target: Target,
    args: argparse.Namespace,
    seconds: float,
) -> Row:
    """Load `target` and also count the server's CPU time, robust where requests/s is noisy, how
    evenly its workers shared the load, Redis's share and what the machine had left."""
    warm = run_load(
        target, connections=args.connections, seconds=seconds * WARM_UP_SHARE, tool=args.tool
    )
    before = servers.tree_cpu_seconds(server.process.pid)
    redis_before = servers.cpu_seconds_of("redis-server")
    idle_before, machine_before = servers.machine_idle_seconds()
    result = run_load(target, connections=args.connections, seconds=seconds, tool=args.tool)
    after = servers.tree_cpu_seconds(server.process.pid)
    redis_used = servers.cpu_seconds_of("redis-server") - redis_before
    idle_after, machine_after = servers.machine_idle_seconds()
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    per_request = 1e6 / result.requests if result.requests else 0.0
    # With several workers the server's own process is their supervisor, which serves nothing.
    workers = [cpu for pid, cpu in used.items() if pid != server.process.pid]
    busiest = max(workers) / sum(workers) if args.workers > 1 and sum(workers) else None
    idle = (idle_after - idle_before) / max(machine_after - machine_before, 1e-9)
    cpu_us, redis_us = sum(used.values()) * per_request, redis_used * per_request
    return Row(scenario, items, result, warm, cpu_us, busiest, redis_us, idle)


def _batch_body(size: int) -> bytes:
    # Rows differ a little so that nothing can answer the whole batch from one computed row.
    items = [{k: round(v * (1 + (i % 7) / 100), 2) for k, v in IRIS.items()} for i in range(size)]
    return json.dumps({"items": items}).encode()


def _bare(args: argparse.Namespace, results: Path, seconds: float, label: str) -> Row:
    port = servers.free_port()
    command = [
        str(servers.BIN / "uvicorn"), "perf.bare_app:app", "--host", servers.LOOPBACK,
        "--port", str(port), "--workers", str(args.workers), "--no-access-log",
        "--loop", "uvloop", "--http", "httptools", "--log-level", "info",
    ]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    server = servers.start(
        "bare", command, port=port, log_path=results / "bare.log", cwd=root, workers=args.workers
    )
    try:
        # The bare app ignores the key header; it is sent so that both requests have one size.
        target = Target(port, "/v1/predict", json.dumps(IRIS).encode(), ["tsk_unused"])
        return _measure(label, 1, server, target, args, seconds)
    finally:
        servers.stop(server)


def _sanity(url: str, keys: list[str], path: str, body: bytes, version: str, workers: int) -> int:
    """A few requests, each on a new connection to reach every worker: 200 and the right version?"""
    answered = 0
    for key in keys[: max(2, 2 * workers)]:
        response = httpx.post(
            url + path,
            content=body,
            headers={"X-API-Key": key, "Content-Type": "application/json"},
            timeout=30,
        )
        answered += 1
        try:
            served = response.json().get("model_version") if response.is_success else None
        except ValueError:
            served = None
        if served != version:
            print(f"  ! {path}: HTTP {response.status_code}, model {served!r}, wanted {version!r}")
    return answered


def _usage_count(admin: httpx.Client, tenant_ids: list[str]) -> int:
    total = 0
    for tenant_id in tenant_ids:
        params = {"group_by": "tenant", "tenant_id": tenant_id}
        response = admin.get("/v1/audit/usage/summary", params=params)
        response.raise_for_status()
        total += sum(int(group["requests"]) for group in response.json()["groups"])
    return total


@contextmanager
def _admin_client(url: str, admin: tuple[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        token = provision.admin_token(client, *admin)
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def _activate(admin: httpx.Client, version: str) -> bool:
    response = admin.post(f"/v1/admin/models/{version}/activate")
    if response.is_success:
        time.sleep(1.5)  # the contract allows 1 s for every worker to switch
        return True
    print(f"  ! activate {version}: HTTP {response.status_code} {response.text[:200]}")
    return False


def _stop_under_load(
    server: servers.Server, target: Target, args: argparse.Namespace, usage: Usage
) -> bool:
    """SIGTERM halfway through a short load: the contract says no usage record is lost even so."""
    outcome: list[LoadResult] = []
    load = threading.Thread(
        target=lambda: outcome.append(
            run_load(target, connections=args.connections, seconds=3.0, tool=args.tool)
        )
    )
    load.start()
    time.sleep(1.5)
    clean = servers.stop(server)
    load.join(timeout=60)
    if outcome:
        result = outcome[0]
        usage.counted += result.requests
        usage.uncounted_at_most += result.uncounted_at_most
        print(f"  SIGTERM under load: {result.requests} answered, {result.non_2xx} non-2xx")
    return clean


def _tenantserve(
    args: argparse.Namespace, results: Path, scratch: Path, seconds: float, rows: list[Row]
) -> tuple[Usage, list[str], str]:
    """Scenarios (b); returns the usage check, the secrets that must not be logged, the setup."""
    database = f"sqlite:///{scratch / 'bench.db'}"
    if args.postgres:
        database = servers.fresh_postgres_database(args.database_url, "tenantserve_bench")
    limiter = "redis://127.0.0.1:6379/14" if servers.redis_answers() else "memory://"
    admin = ("perf-admin", secrets.token_urlsafe(24))
    env = servers.tenantserve_env(
        port=servers.free_port(),
        workers=args.workers,
        database_url=database,
        limiter_uri=limiter,
        model_dir=scratch / "models",
        admin=admin,
    )
    log_path = results / "tenantserve.log"
    usage = Usage()
    server = servers.start_tenantserve(env, log_path=log_path, cwd=scratch)
    try:
        tenant_id, keys = provision.provision(
            server.url, username=admin[0], password=admin[1], tenant="bench",
            keys=args.keys, rate_limit="1000000000/minute", max_batch_size=1000,
        )  # fmt: skip
        # A tenant with a monthly quota, as most customers have (held with the rate limit).
        quota_tenant_id, quota_keys = provision.provision(
            server.url, username=admin[0], password=admin[1], tenant="bench-quota",
            keys=args.keys, rate_limit="1000000000/minute", monthly_quota=2**31 - 1,
        )  # fmt: skip
        tenants = [tenant_id, quota_tenant_id]
        scenarios = [(v, "/v1/predict", json.dumps(IRIS).encode(), 1) for v in VERSIONS]
        scenarios.append((BATCH_VERSION, "/v1/predict/batch", _batch_body(args.batch), args.batch))
        with _admin_client(server.url, admin) as admin_client:
            active = None
            for version, path, body, items in scenarios:
                if version != active and not _activate(admin_client, version):
                    continue
                active = version
                usage.counted += _sanity(server.url, keys, path, body, version, args.workers)
                kind = "batch" if items > 1 else "single"
                measured = [(f"(b) tenantserve {kind} {version}", keys)]
                if items == 1 and version == BATCH_VERSION:
                    measured.append((f"(b) tenantserve single+quota {version}", quota_keys))
                for label, customer_keys in measured:
                    target = Target(server.port, path, body, customer_keys)
                    row = _measure(label, items, server, target, args, seconds)
                    for load in (row.warm_up, row.result):
                        usage.counted += load.requests
                        usage.uncounted_at_most += load.uncounted_at_most
                    rows.append(row)
            usage.live = _usage_count(admin_client, tenants)
        single = Target(server.port, "/v1/predict", json.dumps(IRIS).encode(), keys)
        usage.clean_stop = _stop_under_load(server, single, args, usage)
    finally:
        servers.stop(server)  # a no-op when it stopped already
    server = servers.start_tenantserve(env, log_path=log_path, cwd=scratch)
    try:
        with _admin_client(server.url, admin) as admin_client:
            usage.after_restart = _usage_count(admin_client, tenants)
    finally:
        servers.stop(server)
    for durability in ("written", "write-behind"):
        rows.append(_other_durability(args, results, scratch, seconds, env, keys, durability))
    setup = f"database {database.split(':', 1)[0]}, limiter {limiter.split(':', 1)[0]}"
    return usage, [*keys, *quota_keys, admin[1]], setup


def _other_durability(
    args: argparse.Namespace,
    results: Path,
    scratch: Path,
    seconds: float,
    env: dict[str, str],
    keys: list[str],
    durability: str,
) -> Row:
    """(c) the single prediction again, usage journalled without waiting for fsync (`written`)
    or held in memory only (`write-behind`): what each guarantee costs, against (b)."""
    env = {**env, "TENANTSERVE_USAGE_DURABILITY": durability}
    server = servers.start_tenantserve(env, log_path=results / f"{durability}.log", cwd=scratch)
    try:
        target = Target(server.port, "/v1/predict", json.dumps(IRIS).encode(), keys)
        label = f"(c) {durability} single {BATCH_VERSION}"
        return _measure(label, 1, server, target, args, seconds)
    finally:
        servers.stop(server)


def _floor(rows: list[Row]) -> float:
    """The mean of a run's floors: measured before and after the rest, as the VM's speed can
    drift within a run."""
    floors = [row.result.rps for row in rows if row.scenario.startswith("(a)")]
    return sum(floors) / len(floors) if floors else 0.0


def _print_table(rows: list[Row]) -> None:
    reference = _floor(rows)
    header = f"{'scenario':<38} {'req/s':>8} {'pred/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
    header += f"{'non-2xx':>8} {'sock':>5} {'vs (a)':>7} {'CPU µs/req':>10} {'busiest':>7} "
    print(header + f"{'Redis µs':>8} {'idle':>5}")
    for row in rows:
        r = row.result
        ratio = f"{r.rps / reference:.2f}" if reference else "-"
        busiest = f"{row.busiest_worker:.2f}" if row.busiest_worker is not None else "-"
        print(
            f"{row.scenario:<38} {r.rps:>8.0f} {row.predictions_per_second:>9.0f} "
            f"{r.p50_ms:>7.1f} {r.p99_ms:>7.1f} {r.non_2xx + row.warm_up.non_2xx:>8} "
            f"{r.socket_errors + row.warm_up.socket_errors:>5} {ratio:>7} "
            f"{row.server_cpu_us:>10.0f} {busiest:>7} {row.redis_cpu_us:>8.1f} {row.idle:>5.2f}"
        )


def _usage_ok(usage: Usage) -> bool:
    """Every answered request has its record, and no record exists without a request."""
    found = usage.after_restart
    return found is not None and usage.counted <= found <= usage.counted + usage.uncounted_at_most


def _usage_verdict(usage: Usage) -> str:
    low, high = usage.counted, usage.counted + usage.uncounted_at_most
    found = usage.after_restart
    if found is None:
        return "usage check: not run"
    verdict = "OK, no usage record lost" if _usage_ok(usage) else "FAILED"
    if found < low:
        verdict += f": {low - found} records missing"
    elif found > high:
        verdict += f": {found - high} records more than requests sent"
    return (
        f"usage records: {found} after SIGTERM + restart ({usage.live} live right after the load); "
        f"requests answered {low}, + at most {usage.uncounted_at_most} cut in flight: {verdict}; "
        f"stop on SIGTERM {'clean' if usage.clean_stop else 'NEEDED SIGKILL'}"
    )


def _run(args: argparse.Namespace, seconds: float) -> list[Row] | None:
    """One whole run, its table and verdicts printed; its rows, or None if it failed any check."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = Path(__file__).resolve().parent / "results" / f"bench-{stamp}"
    results.mkdir(parents=True)
    rows: list[Row] = []
    print(
        f"bench: {args.workers} workers, {args.connections} connections, {seconds:g} s a scenario, "
        f"{os.cpu_count()} CPUs, load tool {args.tool}; logs in {results}"
    )
    with tempfile.TemporaryDirectory(prefix="tenantserve-bench-") as scratch:
        try:
            rows.append(_bare(args, results, seconds, "(a) bare FastAPI /v1/predict"))
            usage, hidden, setup = _tenantserve(args, results, Path(scratch), seconds, rows)
            rows.append(_bare(args, results, seconds, "(a) the same, again"))
        except (RuntimeError, httpx.HTTPError, OSError, KeyError, ValueError) as error:
            _print_table(rows)
            print(f"bench failed: {error!r}; server logs in {results}")
            return None
    print(f"tenantserve: {setup}; load tool {rows[-1].result.tool}\n")
    _print_table(rows)
    print("\n" + _usage_verdict(usage))
    log = (results / "tenantserve.log").read_bytes()
    leaked = sum(1 for value in hidden if value.encode() in log)
    print(f"secrets in the server log: {leaked} of {len(hidden)} (keys and admin password)")
    summary = {
        "args": vars(args),
        "setup": setup,
        "rows": [
            {
                **asdict(row.result),
                "scenario": row.scenario,
                "items": row.items,
                "warm_up": asdict(row.warm_up),
                "server_cpu_us": row.server_cpu_us,
                "busiest_worker": row.busiest_worker,
            }
            for row in rows
        ],
        "usage": asdict(usage),
        "secrets_in_log": leaked,
    }
    (results / "bench.json").write_text(json.dumps(summary, indent=1))
    return rows if _usage_ok(usage) and not leaked else None


def _print_medians(runs: list[list[Row]]) -> None:
    """Each scenario's median over the runs: its ratio to its own run's floor, p99, CPU."""
    print(f"\nmedians over {len(runs)} runs (each ratio against the floor of its own run)")
    print(f"{'scenario':<38} {'vs (a)':>7} {'pred/s':>9} {'p99 ms':>7} {'CPU µs/req':>10}")
    for scenario in dict.fromkeys(row.scenario for run in runs for row in run):
        found = [(row, run) for run in runs for row in run if row.scenario == scenario]
        same = [row for row, _ in found]
        ratios = [row.result.rps / _floor(run) for row, run in found]
        print(
            f"{scenario:<38} {statistics.median(ratios):>7.2f} "
            f"{statistics.median(row.predictions_per_second for row in same):>9.0f} "
            f"{statistics.median(row.result.p99_ms for row in same):>7.1f} "
            f"{statistics.median(row.server_cpu_us for row in same):>10.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench", description="tenantserve bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--quick", action="store_true", help="3 s per scenario")
    parser.add_argument("--batch", type=int, default=100, help="items per batch request")
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument("--database-url", default=PG_SERVER, help="server for --postgres")
    parser.add_argument(
        "--rounds", type=int, default=1, help="whole runs, then each scenario's medians"
    )
    args = parser.parse_args(argv)
    seconds = 3.0 if args.quick else args.duration
    runs = []
    for number in range(args.rounds):
        if args.rounds > 1:
            print(f"\nrun {number + 1} of {args.rounds}")
        rows = _run(args, seconds)
        if rows is None:
            return 1
        runs.append(rows)
    if len(runs) > 1:
        _print_medians(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
