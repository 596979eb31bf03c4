"""Time the auditors' usage queries over HTTP on a big table: summary, deep cursor page, CSV export.

    python -m perf.usage_queries                     # 1,000,000 rows, about a minute of seeding
    python -m perf.usage_queries --rows 200000 --reuse

Seeds PostgreSQL database `tenantserve_perf` (dropped and created again; the tests' database
`test` is only used to reach the server) with the project's own schema, then starts tenantserve
on it and times the queries as a client sees them, sampling the server's memory during the export:
a streamed export must not grow with the number of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from perf import provision, servers
from tenants.database import make_engine, upgrade

DATABASE = "tenantserve_perf"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
COLUMNS = (
    "id, at, request_id, tenant_id, key_id, method, path, status_code, items, latency_ms,"
    " model_version"
)
NULL = "\\N"  # NULL in COPY's text format
# Status mix of a healthy API: mostly 200, a few refusals that still leave a record.
STATUSES = ((200, 0.94), (422, 0.02), (429, 0.03), (403, 0.005), (503, 0.005))


def _months() -> tuple[datetime, datetime, datetime]:
    """Start of last month, start of this month, now: the seeded rows span these two months."""
    now = datetime.now(UTC)
    this_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (this_month - timedelta(days=1)).replace(day=1), this_month, now


def _conninfo(url: str) -> str:
    """psycopg's own URL for a SQLAlchemy one (which names the driver)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _lines(
    rows: int, tenants: list[tuple[str, list[str]]], start: float, end: float, middle: float
) -> list[str]:
    """`rows` usage records as COPY text; the model version changes at `middle`."""
    weights = [1 / (rank + 1) for rank in range(len(tenants))]  # a few big tenants, a long tail
    picks = random.choices(range(len(tenants)), weights=weights, k=rows)
    hexes = os.urandom(32 * rows).hex()  # one call for every id and request id: fast
    lines = []
    for number, pick in enumerate(picks):
        tenant_id, key_ids = tenants[pick]
        at = random.uniform(start, end)
        batch = random.random() < 0.1
        roll, status = random.random(), 200
        for code, share in STATUSES:
            roll -= share
            if roll < 0:
                status = code
                break
        items = (random.randint(1, 100) if batch else 1) if status == 200 else 0
        version = ("v1-forest" if at < middle else "v2-logreg") if items else None
        latency = random.expovariate(1 / (12.0 if batch else 3.0))
        base = number * 64
        lines.append(
            f"{hexes[base : base + 32]}\t{datetime.fromtimestamp(at, UTC).isoformat()}\t"
            f"{hexes[base + 32 : base + 64]}\t{tenant_id}\t{random.choice(key_ids)}\tPOST\t"
            f"/v1/predict{'/batch' if batch else ''}\t{status}\t{items}\t{latency:.3f}\t"
            f"{version or NULL}\n"
        )
    return lines


def seed(url: str, rows: int, tenants: list[tuple[str, list[str]]]) -> None:
    """COPY `rows` usage records in chunks: ~10x faster than INSERTs, and the memory stays flat.

    The table's indexes are dropped first and built again from their own definitions afterwards:
    one sorted build is several times faster than a million random insertions into five B-trees
    (the id and request_id keys are random), and the schema ends exactly as the migrations made it.
    """
    last_month, this_month, now = _months()
    started = time.monotonic()
    with psycopg.connect(_conninfo(url)) as connection, connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '256MB'")  # this session's index builds only
        key = cursor.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'usage_records'::regclass AND contype = 'p'"
        ).fetchone()
        indexes = cursor.execute(
            "SELECT indexname, indexdef FROM pg_indexes"
            " WHERE tablename = 'usage_records' AND indexname <> %s",
            [key[0] if key else ""],
        ).fetchall()
        for name, _definition in indexes:
            cursor.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
        if key:
            drop = sql.SQL("ALTER TABLE usage_records DROP CONSTRAINT {}")
            cursor.execute(drop.format(sql.Identifier(key[0])))
        with cursor.copy(f"COPY usage_records ({COLUMNS}) FROM STDIN") as copy:
            for done in range(0, rows, 100_000):
                lines = _lines(
                    min(100_000, rows - done), tenants,
                    last_month.timestamp(), now.timestamp(), this_month.timestamp(),
                )  # fmt: skip
                copy.write("".join(lines))
        if key:
            add = sql.SQL("ALTER TABLE usage_records ADD CONSTRAINT {} {}")
            cursor.execute(add.format(sql.Identifier(key[0]), sql.SQL(key[1])))
        for _name, definition in indexes:
            cursor.execute(definition)  # pg_indexes' own CREATE INDEX statement
        # Fresh planner statistics, as autovacuum would give a table that grew over two months.
        cursor.execute("ANALYZE usage_records")
    seconds = time.monotonic() - started
    print(f"seeded {rows:,} rows in {seconds:.1f} s ({rows / seconds:,.0f} rows/s)")


def _count(
    url: str, tenant_id: str, since: datetime | None = None, until: datetime | None = None
) -> int:
    """The truth to check the API against, straight from the table."""
    query = "SELECT count(*) FROM usage_records WHERE tenant_id = %s"
    params: list[object] = [tenant_id]
    if since and until:
        query += " AND at >= %s AND at < %s"
        params += [since, until]
    with psycopg.connect(_conninfo(url)) as connection:
        row = connection.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def _key_ids(client: httpx.Client, tenant_id: str, count: int) -> list[str]:
    """Real keys, so that every seeded record points at a key an auditor can look up."""
    return [
        str(provision.issue_key(client, tenant_id=tenant_id, name=f"usage-{n}")["id"])
        for n in range(1, count + 1)
    ]


def _timed(client: httpx.Client, path: str, params: dict[str, str]) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.get(path, params=params)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed * 1000, response


def time_summary(client: httpx.Client, tenant_id: str, expected: int) -> dict[str, object]:
    last_month, this_month, _ = _months()
    params = {
        "group_by": "day", "tenant_id": tenant_id,
        "from": last_month.isoformat(), "to": this_month.isoformat(),
    }  # fmt: skip
    timings, groups = [], []
    for _ in range(3):  # the first is cold; the best of the rest shows the warm cost
        elapsed, response = _timed(client, "/v1/audit/usage/summary", params)
        timings.append(elapsed)
        groups = response.json()["groups"]
    total = sum(int(group["requests"]) for group in groups)
    print(
        f"tenant-month summary by day: {len(groups)} days, {total:,} requests "
        f"({'matches' if total == expected else f'SEEDED {expected:,}'}); "
        f"first {timings[0]:.0f} ms, best {min(timings):.0f} ms"
    )
    return {
        "first_ms": timings[0],
        "best_ms": min(timings),
        "days": len(groups),
        "ok": total == expected,
    }


def time_deep_page(client: httpx.Client, tenant_id: str, pages: int) -> dict[str, object]:
    params = {"tenant_id": tenant_id, "limit": "1000"}
    timings: list[float] = []
    previous = None
    ordered = True
    while len(timings) < pages:
        elapsed, response = _timed(client, "/v1/audit/usage", params)
        timings.append(elapsed)
        page = response.json()
        ats = [item["at"] for item in page["items"]]
        # Newest first across page boundaries too (ISO strings of one zone sort as times).
        ordered &= ats == sorted(ats, reverse=True) and (
            previous is None or not ats or ats[0] <= previous
        )
        previous = ats[-1] if ats else previous
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    print(
        f"cursor pages of 1000: {len(timings)} read, first {timings[0]:.0f} ms, median "
        f"{statistics.median(timings):.0f} ms, last (row {len(timings) * 1000:,}) "
        f"{timings[-1]:.0f} ms; newest first: {'yes' if ordered else 'NO'}"
    )
    return {
        "pages": len(timings),
        "first_ms": timings[0],
        "last_ms": timings[-1],
        "ordered": ordered,
    }


def time_export(client: httpx.Client, pid: int, tenant_id: str, expected: int) -> dict[str, object]:
    """Stream the tenant's CSV while another thread samples the server's RSS every 100 ms."""
    samples: list[int] = []
    streaming = threading.Event()
    baseline = servers.tree_rss_kib(pid)

    def sample() -> None:
        while not streaming.wait(0.1):
            samples.append(servers.tree_rss_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    newlines, size, first_byte = 0, 0, 0.0
    started = time.perf_counter()
    try:
        with client.stream("GET", "/v1/audit/usage/export", params={"tenant_id": tenant_id}) as r:
            r.raise_for_status()
            for chunk in r.iter_bytes():
                first_byte = first_byte or time.perf_counter() - started
                newlines += chunk.count(b"\n")
                size += len(chunk)
    finally:
        streaming.set()
        sampler.join()
    seconds = time.perf_counter() - started
    rows = newlines - 1  # the header row
    peak = max(samples, default=baseline)
    print(
        f"CSV export: {rows:,} rows ({'matches' if rows == expected else f'SEEDED {expected:,}'}), "
        f"{size / 1e6:.1f} MB in {seconds:.1f} s ({rows / seconds:,.0f} rows/s), first byte "
        f"{first_byte * 1000:.0f} ms; server RSS {baseline / 1024:.0f} MiB before, peak "
        f"{peak / 1024:.0f} MiB (+{(peak - baseline) / 1024:.0f} MiB) over {len(samples)} samples"
    )
    return {
        "rows": rows, "seconds": seconds, "first_byte_ms": first_byte * 1000,
        "rss_before_kib": baseline, "rss_peak_kib": peak, "ok": rows == expected,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.usage_queries")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url", default=PG_SERVER, help="server to create the db on")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--keys-per-tenant", type=int, default=5)
    parser.add_argument("--pages", type=int, default=50, help="cursor pages of 1000 to follow")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="keep an already seeded database")
    args = parser.parse_args(argv)
    if args.reuse:
        url = make_url(args.database_url).set(database=DATABASE).render_as_string(False)
    else:
        url = servers.fresh_postgres_database(args.database_url, DATABASE)
    engine = make_engine(url)
    upgrade(engine)  # the project's own migrations: the same tables and indexes as production
    engine.dispose()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = Path(__file__).resolve().parent / "results" / f"usage-{stamp}"
    results.mkdir(parents=True)
    admin = ("perf-admin", secrets.token_urlsafe(24))
    last_month, this_month, _ = _months()
    with tempfile.TemporaryDirectory(prefix="tenantserve-usage-") as scratch:
        env = servers.tenantserve_env(
            port=servers.free_port(), workers=args.workers, database_url=url,
            limiter_uri="memory://", model_dir=Path(scratch) / "models", admin=admin,
        )  # fmt: skip
        server = servers.start_tenantserve(
            env, log_path=results / "tenantserve.log", cwd=Path(scratch)
        )
        try:
            # Generous read timeout: a slow query is a figure to report, not an error.
            with httpx.Client(base_url=server.url, timeout=httpx.Timeout(120, connect=5)) as client:
                token = provision.admin_token(client, *admin)
                client.headers["Authorization"] = f"Bearer {token}"
                tenant_ids = [
                    provision.ensure_tenant(client, name=f"perf-usage-{n}", rate_limit="600/minute")
                    for n in range(1, args.tenants + 1)
                ]
                if not args.reuse or _count(url, tenant_ids[0]) == 0:
                    tenants = [
                        (tenant_id, _key_ids(client, tenant_id, args.keys_per_tenant))
                        for tenant_id in tenant_ids
                    ]
                    seed(url, args.rows, tenants)
                big = tenant_ids[0]  # the heaviest tenant: the worst case for every query
                figures = {
                    "summary": time_summary(client, big, _count(url, big, last_month, this_month)),
                    "deep_page": time_deep_page(client, big, args.pages),
                    "export": time_export(client, server.process.pid, big, _count(url, big)),
                }
        finally:
            servers.stop(server)
    (results / "usage_queries.json").write_text(
        json.dumps({"args": vars(args), **figures}, indent=1)
    )
    print(f"figures written to {results / 'usage_queries.json'}")
    ok = all(
        bool(figure.get("ok", True)) and bool(figure.get("ordered", True))
        for figure in figures.values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
