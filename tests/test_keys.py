"""An API key's life as its tenant and their admin see it, on both databases.

Issue → use → rotate with grace → revoke, expiry, forgeries, scopes, suspension and limit
changes; and, with two real uvicorn workers, a revocation every worker obeys within 1 s.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from auth import keys
from service.api.key_cache import KeyCache
from service.config import DEV_API_KEY_PEPPER
from tenants.repository import KeyRecord
from tests.conftest import (
    FEATURES,
    LiveServer,
    admin_token,
    audit_events,
    bearer,
    create_tenant,
    issue_key,
    new_customer,
    stored_rows,
    wait_for,
)

GRACE_SECONDS = 2


def predict(client: httpx.Client | TestClient, key: str) -> httpx.Response:
    return client.post("/v1/predict", json=FEATURES, headers={"X-API-Key": key})


def in_a_moment(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "invalid_credentials"
    assert response.headers["content-type"] == "application/problem+json"
    assert "X-API-Key" in response.headers["WWW-Authenticate"]


def test_key_lifecycle_issue_use_rotate_revoke(client: TestClient, database_url: str) -> None:
    customer = new_customer(client)
    issued = customer.key
    secret = issued["key"]
    assert secret.startswith("tsk_")
    assert issued["prefix"] == f"tsk_{issued['id']}" and secret.startswith(issued["prefix"])
    assert issued["status"] == "active"
    assert issued["tenant_id"] == customer.tenant["id"]
    assert set(issued["scopes"]) == {"predict", "usage:read"}
    assert predict(client, secret).status_code == 200

    admin = bearer(customer.token)
    before_rotation = time.monotonic()
    rotated = client.post(
        f"/v1/admin/keys/{issued['id']}/rotate",
        json={"grace_seconds": GRACE_SECONDS},
        headers=admin,
    )
    assert rotated.status_code == 201, rotated.text
    replacement = rotated.json()
    assert replacement["id"] != issued["id"] and replacement["key"].startswith("tsk_")
    for field in ("name", "scopes", "rate_limit", "tenant_id"):
        assert replacement[field] == issued[field]
    assert predict(client, replacement["key"]).status_code == 200
    assert predict(client, secret).status_code == 200, "the old key must work during the grace"
    # When the refusal's answer arrived: the server decided before then (a check started just
    # before the grace ended may be decided just after it, on a busy machine).
    answered: list[float] = []

    def refused() -> bool:
        status = predict(client, secret).status_code
        answered.append(time.monotonic())
        return status == 401

    wait_for(refused, within=GRACE_SECONDS + 1, since=before_rotation)
    refused_after = answered[-1] - before_rotation
    assert refused_after >= GRACE_SECONDS, "the old key was refused before its grace ended"
    assert_refused(predict(client, secret))
    assert predict(client, replacement["key"]).status_code == 200

    revoked = client.post(f"/v1/admin/keys/{replacement['id']}/revoke", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    wait_for(lambda: predict(client, replacement["key"]).status_code == 401, within=1.0)
    assert_refused(predict(client, replacement["key"]))

    listed = client.get(f"/v1/admin/tenants/{customer.tenant['id']}/keys", headers=admin)
    assert listed.status_code == 200
    assert {k["id"]: k["status"] for k in listed.json()} == {
        issued["id"]: "revoked",
        replacement["id"]: "revoked",
    }
    actions = [e["action"] for e in audit_events(client, customer.token)]
    assert {"key.issue", "key.rotate", "key.revoke"} <= set(actions)
    # Each secret was shown in its creating response only.
    elsewhere = [
        listed.text,
        revoked.text,
        client.get("/v1/audit/events", headers=admin).text,
        repr(stored_rows(database_url, "SELECT * FROM audit_events")),
    ]
    for key in (secret, replacement["key"]):
        assert not any(key in text for text in elsewhere)
    assert secret not in rotated.text


def test_revoked_key_gets_401_within_a_second(client: TestClient) -> None:
    customer = new_customer(client)
    assert predict(client, customer.key["key"]).status_code == 200  # now cached by the worker
    revoked = client.post(
        f"/v1/admin/keys/{customer.key['id']}/revoke", headers=bearer(customer.token)
    )
    assert revoked.status_code == 200, revoked.text
    assert customer.key["key"] not in revoked.text
    wait_for(lambda: predict(client, customer.key["key"]).status_code == 401, within=1.0)


def test_key_expires_at_its_time(client: TestClient) -> None:
    # Three seconds: on a loaded machine creating the tenant and key alone can take one.
    customer = new_customer(client, expires_at=in_a_moment(3))
    assert customer.key["expires_at"] is not None
    assert predict(client, customer.key["key"]).status_code == 200
    wait_for(lambda: predict(client, customer.key["key"]).status_code == 401, within=4.0)
    assert_refused(predict(client, customer.key["key"]))


def test_expiry_in_the_past_is_refused_at_creation(client: TestClient) -> None:
    token = admin_token(client)
    tenant = create_tenant(client, token)
    response = client.post(
        f"/v1/admin/tenants/{tenant['id']}/keys",
        json={"name": "stale", "expires_at": in_a_moment(-60)},
        headers=bearer(token),
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    listed = client.get(f"/v1/admin/tenants/{tenant['id']}/keys", headers=bearer(token))
    assert listed.json() == []


def test_unknown_revoked_expired_and_forged_keys_get_the_same_401(client: TestClient) -> None:
    customer = new_customer(client)
    token, tenant = customer.token, customer.tenant
    live = customer.key
    expiring = issue_key(client, token, tenant["id"], expires_at=in_a_moment(1))
    revoked = issue_key(client, token, tenant["id"])
    assert client.post(f"/v1/admin/keys/{revoked['id']}/revoke", headers=bearer(token)).is_success
    last = live["key"][-1]
    candidates = {
        "unknown": keys.generate(DEV_API_KEY_PEPPER).token,
        "wrong checksum": live["key"][:-1] + ("A" if last != "A" else "B"),
        "another key's id, wrong secret": keys.generate(DEV_API_KEY_PEPPER, live["id"]).token,
        "not a key at all": "hunter2",
        "revoked": revoked["key"],
        "expired": expiring["key"],
    }
    wait_for(lambda: predict(client, expiring["key"]).status_code == 401, within=2.0)

    answers = {name: predict(client, key) for name, key in candidates.items()}
    for response in answers.values():
        assert_refused(response)
    bodies = {name: {**r.json(), "request_id": None} for name, r in answers.items()}
    assert len({json.dumps(body, sort_keys=True) for body in bodies.values()}) == 1, bodies
    assert len({r.headers["WWW-Authenticate"] for r in answers.values()}) == 1
    # No key at all is told so (the contract's `missing_credentials`), with the same challenge.
    missing = client.post("/v1/predict", json=FEATURES)
    assert missing.status_code == 401
    assert missing.json()["code"] == "missing_credentials"
    assert missing.headers["WWW-Authenticate"] == answers["unknown"].headers["WWW-Authenticate"]
    assert predict(client, live["key"]).status_code == 200, "the real key is unaffected"


def test_scopes_limit_what_a_key_may_call(client: TestClient) -> None:
    token = admin_token(client)
    tenant = create_tenant(client, token)
    reader = issue_key(client, token, tenant["id"], scopes=["usage:read"])
    predictor = issue_key(client, token, tenant["id"], scopes=["predict"])
    assert reader["scopes"] == ["usage:read"] and predictor["scopes"] == ["predict"]

    refused = predict(client, reader["key"])
    assert refused.status_code == 403
    assert refused.json()["code"] == "forbidden"
    usage = client.get("/v1/usage", headers={"X-API-Key": reader["key"]})
    assert usage.status_code == 200, usage.text
    assert usage.json()["tenant_id"] == tenant["id"]

    assert predict(client, predictor["key"]).status_code == 200
    refused = client.get("/v1/usage", headers={"X-API-Key": predictor["key"]})
    assert refused.status_code == 403
    assert refused.json()["code"] == "forbidden"


def test_suspended_tenant_gets_403_until_reactivated(client: TestClient) -> None:
    customer = new_customer(client)
    tenant_url = f"/v1/admin/tenants/{customer.tenant['id']}"
    assert predict(client, customer.key["key"]).status_code == 200

    suspended = client.patch(
        tenant_url, json={"status": "suspended"}, headers=bearer(customer.token)
    )
    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["status"] == "suspended"
    wait_for(lambda: predict(client, customer.key["key"]).status_code == 403, within=1.0)
    for response in (
        predict(client, customer.key["key"]),
        client.get("/v1/usage", headers=customer.headers),
    ):
        assert response.status_code == 403
        assert response.json()["code"] == "tenant_suspended"

    reactivated = client.patch(
        tenant_url, json={"status": "active"}, headers=bearer(customer.token)
    )
    assert reactivated.json()["status"] == "active"
    wait_for(lambda: predict(client, customer.key["key"]).status_code == 200, within=1.0)


def test_rate_limit_change_is_obeyed_within_a_second(client: TestClient) -> None:
    token = admin_token(client)
    customer = new_customer(
        client, token, tenant=create_tenant(client, token, rate_limit="100/minute")
    )
    assert predict(client, customer.key["key"]).headers["X-RateLimit-Limit"] == "100"

    changed = client.patch(
        f"/v1/admin/tenants/{customer.tenant['id']}",
        json={"rate_limit": "5/minute"},
        headers=bearer(token),
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["rate_limit"] == "5/minute"
    wait_for(
        lambda: predict(client, customer.key["key"]).headers["X-RateLimit-Limit"] == "5",
        within=1.0,
    )
    statuses = [predict(client, customer.key["key"]).status_code for _ in range(5)]
    assert statuses[-1] == 429, statuses
    limited = predict(client, customer.key["key"])
    assert limited.json()["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["X-RateLimit-Remaining"] == "0"


# Two real workers: each must drop its own cached copy of a revoked key.


def answers_by_worker(log: str) -> dict[int, Counter[int]]:
    """Per worker process, its answers to `/v1/predict` by status, from its request log lines."""
    answers: dict[int, Counter[int]] = defaultdict(Counter)
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the line being written as we read
            continue
        if entry.get("event") == "request" and entry.get("path") == "/v1/predict":
            answers[entry["pid"]][entry["status_code"]] += 1
    return answers


def spread(url: str, key: str, count: int) -> list[int]:
    """`count` predictions, each on a new connection and several at once, so all workers serve."""

    def one(_: int) -> int:
        with httpx.Client(base_url=url, timeout=10) as fresh:
            return predict(fresh, key).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        return list(pool.map(one, range(count)))


def workers_answering(server: LiveServer, status: int, before: dict[int, Counter[int]]) -> int:
    """How many workers answered `status` since the `before` snapshot."""
    now = answers_by_worker(server.output())
    return sum(
        1 for pid, counts in now.items() if counts[status] > before.get(pid, Counter())[status]
    )


@pytest.mark.slow
def test_revocation_reaches_every_worker_within_a_second(two_workers: LiveServer) -> None:
    server = two_workers
    with server.client() as http:
        customer = new_customer(http)
        key = customer.key["key"]
        started = answers_by_worker(server.output())  # the shared log: earlier tests' lines
        assert spread(server.url, key, 40) == [200] * 40
        wait_for(lambda: workers_answering(server, 200, started) == 2, within=2.0)

        revoked = http.post(
            f"/v1/admin/keys/{customer.key['id']}/revoke", headers=bearer(customer.token)
        )
        assert revoked.status_code == 200, revoked.text
        revoked_at = time.monotonic()
        wait_for(lambda: predict(http, key).status_code == 401, within=1.0, since=revoked_at)
        time.sleep(max(0.0, revoked_at + 1.0 - time.monotonic()))
        before = answers_by_worker(server.output())
        assert spread(server.url, key, 40) == [401] * 40
        wait_for(lambda: workers_answering(server, 401, before) == 2, within=2.0)
    assert key not in server.output()


def test_a_lookup_that_straddles_a_revocation_is_not_cached() -> None:
    """The worker's side of the race: a row read before a revocation, cached after the clear."""
    cache = KeyCache()
    stale = KeyRecord(
        key_id="k", key_hash="h", tenant_id="t", scopes=frozenset({"predict"}),
        rate_limit="1/second", expires_at=None, revoked_at=None, tenant_active=True,
        max_batch_size=1, monthly_quota=None,
    )  # fmt: skip
    generation = cache.generation  # the lookup starts …
    cache.clear()  # … the poller sees the revocation and clears …
    assert cache.put("k", stale, generation=generation) is not None  # … this request goes on,
    assert cache.get("k") == (False, None, None)  # but the next one reads the database again.
    cache.put("k", stale, generation=cache.generation)
    assert cache.get("k")[0]


def test_requests_arriving_together_with_an_uncached_key_look_it_up_once(
    client: TestClient,
) -> None:
    """A worker's first requests with a key, or its first after the key's record expired or
    was cleared, ask the database for it once between them, not once each."""
    customer = new_customer(client)
    engine = client.app.state.resources.engine  # type: ignore[attr-defined]
    lookups: list[str] = []

    def count(_connection: object, _cursor: object, statement: str, *_rest: object) -> None:
        if "FROM api_keys" in statement:
            lookups.append(statement)

    gate = threading.Barrier(20, timeout=30)

    def one(_: int) -> int:
        gate.wait()
        return predict(client, customer.key["key"]).status_code

    event.listen(engine, "before_cursor_execute", count)
    try:
        with ThreadPoolExecutor(20) as pool:
            statuses = Counter(pool.map(one, range(20)))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert statuses == {200: 20}
    assert len(lookups) == 1, lookups
