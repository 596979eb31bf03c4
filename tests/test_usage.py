"""Usage metering and the auditor's API (contract "Usage records", issue 5).

One record per request that passed API-key authentication, whatever its outcome, none for the
rest; none lost when a server is stopped under load or its database goes away for a while; and
the auditor's listing, filters, summaries and CSV export all agree with each other.
"""

from __future__ import annotations

import csv
import io
import itertools
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from service.config import Settings
from tests.conftest import (
    FEATURES,
    LiveServer,
    admin_token,
    bearer,
    create_tenant,
    issue_key,
    live_server,
    new_customer,
    new_staff,
    server_env,
)
from tests.test_rate_limits import CuttableProxy, app_client, poll

Client = httpx.Client | TestClient
Record = dict[str, Any]


def usage_pages(
    client: Client, token: str, *, limit: int = 1000, **filters: Any
) -> Iterator[list[Record]]:
    """The auditor's listing page by page, following `next_cursor`; each page is fetched only
    when the one before it has been consumed."""
    cursor = None
    while True:
        params = {**filters, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/audit/usage", params=params, headers=bearer(token))
        assert response.status_code == 200, response.text
        yield response.json()["items"]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return


def all_records(client: Client, token: str, **filters: Any) -> list[Record]:
    """Every record the listing holds for these filters."""
    return [record for page in usage_pages(client, token, **filters) for record in page]


def records_once_flushed(client: Client, token: str, expected: int, **filters: Any) -> list[Record]:
    """The records, once at least `expected` of them are written (the writer runs behind)."""
    return poll(lambda: all_records(client, token, **filters), lambda r: len(r) >= expected)


def send(
    client: Client, method: str, path: str, headers: dict[str, str], **kwargs: Any
) -> httpx.Response:
    """One request under a fresh request id of the caller's, which the answer echoes."""
    request_id = f"test-{uuid.uuid4().hex}"
    response = client.request(
        method, path, headers={**headers, "X-Request-ID": request_id}, **kwargs
    )
    assert response.headers["X-Request-ID"] == request_id
    return response


def request_ids(records: list[Record]) -> Counter[str]:
    return Counter(record["request_id"] for record in records)


# Which requests leave a record, and what it says


def test_records_are_exactly_the_authenticated_requests(client: TestClient) -> None:
    token = admin_token(client)
    tenant = create_tenant(client, token, rate_limit="5/minute")
    key = {"X-API-Key": issue_key(client, token, tenant["id"])["key"]}
    reader = {"X-API-Key": issue_key(client, token, tenant["id"], scopes=["usage:read"])["key"]}
    calls: list[tuple[str, str, dict[str, str], dict[str, Any], int, int]] = [
        # method, path, headers, body, status seen, predictions served
        ("POST", "/v1/predict", key, {"json": FEATURES}, 200, 1),
        ("POST", "/v1/predict/batch", key, {"json": {"items": [FEATURES] * 3}}, 200, 3),
        ("POST", "/v1/predict", key, {"json": {"petal_width": 0}}, 422, 0),
        ("POST", "/v1/predict", reader, {"json": FEATURES}, 403, 0),
        ("GET", "/v1/usage", key, {}, 200, 0),
        ("POST", "/v1/predict", key, {"json": FEATURES}, 200, 1),
        ("POST", "/v1/predict", {}, {"json": FEATURES}, 401, 0),
        ("POST", "/v1/predict", {"X-API-Key": "tsk_invented"}, {"json": FEATURES}, 401, 0),
        ("GET", "/health", key, {}, 200, 0),
        ("GET", "/ready", key, {}, 200, 0),
        ("GET", "/metrics", key, {}, 200, 0),
        # Last: records are written in order, so once this one is, any wrongful one is too.
        ("POST", "/v1/predict", key, {"json": FEATURES}, 429, 0),
    ]
    expected: dict[str, tuple[str, str, int, int]] = {}
    for method, path, headers, body, status, items in calls:
        response = send(client, method, path, headers, **body)
        assert response.status_code == status, (path, response.text)
        if status == 401 or path in ("/health", "/ready", "/metrics"):
            continue
        expected[response.headers["X-Request-ID"]] = (method, path, status, items)

    records = records_once_flushed(client, token, len(expected))
    assert request_ids(records) == Counter(expected.keys())
    for record in records:
        assert (record["method"], record["path"], record["status_code"], record["items"]) == (
            expected[record["request_id"]]
        )
        assert record["tenant_id"] == tenant["id"]
        assert record["latency_ms"] >= 0
        served = record["items"] > 0
        assert (record["model_version"] is not None) == served


def test_a_reused_request_id_still_gives_one_record_a_request(client: TestClient) -> None:
    customer = new_customer(client)
    headers = {**customer.headers, "X-Request-ID": "the-same-id"}
    for _ in range(3):
        assert client.post("/v1/predict", json=FEATURES, headers=headers).status_code == 200
    records = records_once_flushed(client, customer.token, 3)
    assert [record["request_id"] for record in records] == ["the-same-id"] * 3
    assert len({record["id"] for record in records}) == 3


# The auditor's API over a known set of records


@dataclass
class Seeded:
    token: str
    tenants: list[str]
    keys: list[str]
    records: list[Record]
    """Every record, as the unfiltered listing returns them."""


def predict_as(client: Client, headers: dict[str, str], count: int) -> None:
    for _ in range(count):
        assert client.post("/v1/predict", json=FEATURES, headers=headers).status_code == 200


@pytest.fixture
def seeded(client: TestClient) -> Seeded:
    """Two tenants: the first with two keys. 200s, a 422 and a usage read, 9 records in all."""
    token = admin_token(client)
    first = new_customer(client, token)
    second_key = issue_key(client, token, first.tenant["id"])
    other = new_customer(client, token)
    predict_as(client, first.headers, 3)
    assert client.post("/v1/predict", json={}, headers=first.headers).status_code == 422
    predict_as(client, {"X-API-Key": second_key["key"]}, 2)
    assert client.get("/v1/usage", headers={"X-API-Key": second_key["key"]}).status_code == 200
    predict_as(client, other.headers, 2)
    records = records_once_flushed(client, token, 9)
    assert len(records) == 9
    return Seeded(
        token,
        [first.tenant["id"], other.tenant["id"]],
        [first.key["id"], second_key["id"], other.key["id"]],
        records,
    )


def at(record: Record) -> datetime:
    return datetime.fromisoformat(record["at"])


def newest_first(records: list[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (at(r), r["id"]), reverse=True)


def test_paging_yields_every_record_once_while_new_ones_arrive(client: TestClient) -> None:
    customer = new_customer(client)
    predict_as(client, customer.headers, 12)
    before = records_once_flushed(client, customer.token, 12)
    assert before == newest_first(before)
    pages: list[list[Record]] = []
    for page in usage_pages(client, customer.token, limit=5):
        pages.append(page)
        if len(pages) == 1:
            # Newer records arrive between pages: the pages after the first are not moved.
            predict_as(client, customer.headers, 4)
            records_once_flushed(client, customer.token, 16)
    assert [len(page) for page in pages] == [5, 5, 2]
    garbled = client.get(
        "/v1/audit/usage", params={"cursor": "not-a-cursor"}, headers=bearer(customer.token)
    )
    assert garbled.status_code == 422
    assert [record for page in pages for record in page] == before
    assert len(records_once_flushed(client, customer.token, 16)) == 16


def filter_cases(s: Seeded) -> dict[str, tuple[dict[str, Any], Callable[[Record], bool]]]:
    """Filters of the listing, each with the records it should keep."""
    tenant, key = s.tenants[0], s.keys[1]
    newer, middle, older = (at(s.records[i]) for i in (2, 4, 7))
    return {
        "tenant": ({"tenant_id": tenant}, lambda r: r["tenant_id"] == tenant),
        "key": ({"key_id": key}, lambda r: r["key_id"] == key),
        "status": ({"status_code": 422}, lambda r: r["status_code"] == 422),
        "path": ({"path": "/v1/usage"}, lambda r: r["path"] == "/v1/usage"),
        "from": ({"from": middle.isoformat()}, lambda r: at(r) >= middle),
        "to": ({"to": middle.isoformat()}, lambda r: at(r) < middle),
        "tenant, from and to": (
            {"tenant_id": tenant, "from": older.isoformat(), "to": newer.isoformat()},
            lambda r: r["tenant_id"] == tenant and older <= at(r) < newer,
        ),
    }


def test_filters_select_exactly_the_matching_records(seeded: Seeded, client: TestClient) -> None:
    for name, (filters, keep) in filter_cases(seeded).items():
        expected = [record for record in seeded.records if keep(record)]
        assert expected, f"the seed should hold records for the {name} filter"
        assert all_records(client, seeded.token, **filters) == expected, name


def test_summary_counts_equal_the_records(seeded: Seeded, client: TestClient) -> None:
    groupers: dict[str, Callable[[Record], str]] = {
        "tenant": lambda r: r["tenant_id"],
        "key": lambda r: r["key_id"],
        "day": lambda r: at(r).date().isoformat(),
    }
    for group_by, group_of in groupers.items():
        expected: dict[str, dict[str, Any]] = {}
        for record in seeded.records:
            group = expected.setdefault(
                group_of(record),
                {"group": group_of(record), "requests": 0, "predictions": 0, "errors": 0},
            )
            group["requests"] += 1
            group["predictions"] += record["items"]
            group["errors"] += record["status_code"] >= 400
        response = client.get(
            "/v1/audit/usage/summary", params={"group_by": group_by}, headers=bearer(seeded.token)
        )
        assert response.status_code == 200, response.text
        groups = response.json()["groups"]
        assert sorted(groups, key=lambda g: g["group"]) == sorted(
            expected.values(), key=lambda g: g["group"]
        ), group_by


def test_a_tenant_auditor_sees_only_its_tenant(seeded: Seeded, client: TestClient) -> None:
    own, other = seeded.tenants
    _, token = new_staff(client, seeded.token, role="auditor", tenant_id=own)
    assert all_records(client, token) == [r for r in seeded.records if r["tenant_id"] == own]
    summary = client.get("/v1/audit/usage/summary", headers=bearer(token)).json()["groups"]
    assert [group["group"] for group in summary] == [own]
    export = client.get("/v1/audit/usage/export", headers=bearer(token)).text
    assert {row["tenant_id"] for row in csv.DictReader(io.StringIO(export))} == {own}
    refused = client.get("/v1/audit/usage", params={"tenant_id": other}, headers=bearer(token))
    assert refused.status_code == 404


def _as_listed(row: dict[str, str]) -> Record:
    """A CSV row in the JSON listing's types: every cell of CSV is text."""
    return {
        **row,
        "at": datetime.fromisoformat(row["at"]),
        "status_code": int(row["status_code"]),
        "items": int(row["items"]),
        "latency_ms": float(row["latency_ms"]),
        "model_version": row["model_version"] or None,
        "replay": row["replay"] == "True",
    }


def test_the_csv_export_holds_the_same_rows_as_the_listing(
    seeded: Seeded, client: TestClient
) -> None:
    for filters in ({}, {"tenant_id": seeded.tenants[0]}):
        response = client.get(
            "/v1/audit/usage/export", params=filters, headers=bearer(seeded.token)
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/csv")
        rows = [_as_listed(row) for row in csv.DictReader(io.StringIO(response.text))]
        listed = [{**r, "at": at(r)} for r in all_records(client, seeded.token, **filters)]
        assert rows == listed, filters


def test_a_customer_sees_its_own_tenants_totals_and_quota(client: TestClient) -> None:
    token = admin_token(client)
    tenant = create_tenant(client, token, monthly_quota=100)
    customer = new_customer(client, token, tenant=tenant)
    predict_only = issue_key(client, token, tenant["id"], scopes=["predict"])
    stranger = new_customer(client, token)
    predict_as(client, customer.headers, 2)
    batch = {"items": [FEATURES] * 3}
    assert client.post("/v1/predict/batch", json=batch, headers=customer.headers).status_code == 200
    assert client.post("/v1/predict", json={}, headers=customer.headers).status_code == 422
    predict_as(client, stranger.headers, 4)
    records_once_flushed(client, token, 8)

    response = client.get("/v1/usage", headers=customer.headers)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "tenant_id": tenant["id"],
        "requests": 4,
        "predictions": 5,
        "errors": 1,
        "quota": {"monthly_limit": 100, "used": 5, "remaining": 95},
    }
    later = client.get(
        "/v1/usage", params={"from": "2999-01-01T00:00:00Z"}, headers=customer.headers
    )
    assert later.json()["requests"] == 0
    assert later.json()["quota"]["used"] == 5
    refused = client.get("/v1/usage", headers={"X-API-Key": predict_only["key"]})
    assert refused.status_code == 403


def test_a_customer_reads_its_own_writes_at_once(make_settings: Callable[..., Settings]) -> None:
    # A minute between flushes: only the read itself can bring the records to the database.
    with app_client(make_settings, usage_flush_interval_ms=60_000) as client:
        token = admin_token(client)
        tenant = create_tenant(client, token, monthly_quota=100)
        customer = new_customer(client, token, tenant=tenant)
        batch = {"items": [FEATURES] * 3}
        for reads in range(3):
            predicted = client.post("/v1/predict/batch", json=batch, headers=customer.headers)
            assert predicted.status_code == 200, predicted.text
            usage = client.get("/v1/usage", headers=customer.headers).json()
            served = 3 * (reads + 1)
            # Every batch and every earlier read is a request; this read is not one yet.
            assert (usage["requests"], usage["predictions"]) == (2 * reads + 1, served)
            left = 100 - served
            assert usage["quota"] == {"monthly_limit": 100, "used": served, "remaining": left}
            # The same figure as the quota counter behind the answer's RateLimit field.
            assert f'"quota";r={left};' in predicted.headers["RateLimit"]


# Nothing lost: SIGTERM under load, and a database that goes away for a while (live servers)


class LoadResult:
    """Request ids sent, and the status of each one whose answer came back."""

    def __init__(self) -> None:
        self.sent: set[str] = set()
        self.answered: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, request_id: str, status: int | None) -> None:
        with self._lock:
            self.sent.add(request_id)
            if status is not None:
                self.answered[request_id] = status


def keep_predicting(
    server: LiveServer,
    headers: dict[str, str],
    result: LoadResult,
    bodies: Sequence[dict[str, float]] = (FEATURES,),
) -> None:
    """Predict, with `bodies` in turn, until the server stops answering."""
    with server.client() as client:
        for body in itertools.cycle(bodies):
            request_id = f"load-{uuid.uuid4().hex}"
            try:
                response = client.post(
                    "/v1/predict", json=body, headers={**headers, "X-Request-ID": request_id}
                )
            except httpx.HTTPError:
                result.record(request_id, None)
                return
            result.record(request_id, response.status_code)


def run_load(
    server: LiveServer, headers: dict[str, str], threads: int
) -> tuple[LoadResult, list[threading.Thread]]:
    """Clients predicting in parallel, each until the server stops answering it."""
    result = LoadResult()
    workers = [
        threading.Thread(target=keep_predicting, args=(server, headers, result))
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    return result, workers


def assert_recorded_once(records: list[Record], result: LoadResult) -> None:
    """Every answer a client got has exactly one record; nothing is recorded twice."""
    counts = request_ids(records)
    assert set(counts) <= result.sent
    assert [rid for rid, n in counts.items() if n > 1] == []
    assert [rid for rid in result.answered if counts[rid] != 1] == []


def test_sigterm_under_load_loses_no_record(
    database_url: str, make_settings: Callable[..., Settings], model_dir: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    env = server_env(database_url, model_dir, usage_journal_dir=str(journal))
    with live_server(env, tmp_path / "server.log", workers=2) as server:
        with server.client() as client:
            customer = new_customer(client, rate_limit="100000/minute")
        result, threads = run_load(server, customer.headers, 6)
        poll(lambda: len(result.answered), lambda answered: answered >= 150, within=60)
        assert all(thread.is_alive() for thread in threads), "the load should still be running"
        server.process.terminate()
        for thread in threads:
            thread.join(timeout=60)
        # Exited of itself (uvicorn re-raises the SIGTERM it handled), each worker shut down.
        assert server.stop() in (0, -signal.SIGTERM)
        assert server.output().count('"event":"stopped"') == 2
    # Started again on the same database and journal (in-process: a quicker start).
    with app_client(make_settings, usage_journal_dir=journal) as client:
        records = all_records(client, admin_token(client), tenant_id=customer.tenant["id"])
    assert_recorded_once(records, result)


@pytest.fixture
def database_proxy(postgresql_url: str) -> Iterator[tuple[CuttableProxy, str]]:
    """A proxy to the test PostgreSQL, and the database URL that goes through it."""
    url = make_url(postgresql_url)
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proxy.cut()


def test_a_database_outage_loses_no_record(
    database_proxy: tuple[CuttableProxy, str], model_dir: Path, tmp_path: Path
) -> None:
    proxy, proxied_url = database_proxy
    env = server_env(proxied_url, model_dir)
    with live_server(env, tmp_path / "server.log") as server, server.client() as client:
        token = admin_token(client)
        customer = new_customer(client, token, rate_limit="100000/minute")
        result = LoadResult()

        def predict(count: int) -> None:
            for _ in range(count):
                response = send(client, "POST", "/v1/predict", customer.headers, json=FEATURES)
                result.record(response.headers["X-Request-ID"], response.status_code)

        predict(10)
        proxy.cut()
        cut_at = time.monotonic()
        # Served from the key cache, recorded in memory, while the database is away.
        while time.monotonic() - cut_at < 3:
            predict(1)
            time.sleep(0.1)
        proxy.restore()
        predict(10)
        assert set(result.answered.values()) == {200}
        records = records_once_flushed(
            client, token, len(result.sent), tenant_id=customer.tenant["id"]
        )
    assert_recorded_once(records, result)
    assert len(records) == len(result.sent)
    assert '"event":"usage_write_failed"' in server.output(), "the outage should reach the writer"
