"""Idempotent retries (contract "Idempotent retries", issue 14): a retried request with the
same Idempotency-Key and body gets the first answer again, runs nothing and bills nothing."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.conftest import FEATURES, admin_token, bearer, live_server, new_customer, server_env
from tests.test_rate_limits import app_client, poll
from tests.test_usage import all_records

OTHER = {**FEATURES, "petal_length": 4.5, "petal_width": 1.5}


def keyed(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


def test_a_retry_gets_the_first_answer_unbilled(client: TestClient) -> None:
    customer = new_customer(client, rate_limit="1000/minute")
    client.patch(
        f"/v1/admin/tenants/{customer.tenant['id']}",
        json={"monthly_quota": 100},
        headers=bearer(customer.token),
    )
    headers = keyed(customer.headers, f"order-{uuid.uuid4()}")
    first = client.post("/v1/predict/batch", json={"items": [FEATURES] * 3}, headers=headers)
    retry = client.post("/v1/predict/batch", json={"items": [FEATURES] * 3}, headers=headers)
    assert first.status_code == retry.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert retry.headers["X-Request-ID"] != first.headers["X-Request-ID"]

    mismatch = client.post("/v1/predict/batch", json={"items": [OTHER]}, headers=headers)
    assert mismatch.status_code == 422
    assert mismatch.json()["code"] == "idempotency_mismatch"

    usage = poll(
        lambda: client.get("/v1/usage", headers=customer.headers).json(),
        lambda body: body["requests"] >= 3,
    )
    assert usage["predictions"] == 3
    assert usage["quota"]["used"] == 3
    records = all_records(client, customer.token, tenant_id=customer.tenant["id"])
    by_id = {r["request_id"]: r for r in records}
    assert by_id[first.headers["X-Request-ID"]]["items"] == 3
    assert by_id[first.headers["X-Request-ID"]]["replay"] is False
    assert by_id[retry.headers["X-Request-ID"]]["items"] == 0
    assert by_id[retry.headers["X-Request-ID"]]["replay"] is True
    export = client.get("/v1/audit/usage/export", headers=bearer(customer.token)).text
    assert export.splitlines()[0].endswith(",replay")


def test_keys_are_scoped_to_their_caller_and_refusals_are_not_kept(client: TestClient) -> None:
    token = admin_token(client)
    one, other = new_customer(client, token), new_customer(client, token)
    key = f"shared-{uuid.uuid4()}"
    assert client.post("/v1/predict", json=FEATURES, headers=keyed(one.headers, key)).is_success
    theirs = client.post("/v1/predict", json=FEATURES, headers=keyed(other.headers, key))
    assert theirs.status_code == 200
    assert "Idempotent-Replayed" not in theirs.headers

    fixed_later = f"fixed-{uuid.uuid4()}"
    invalid = {**FEATURES, "sepal_length": -1}
    refused = client.post("/v1/predict", json=invalid, headers=keyed(one.headers, fixed_later))
    assert refused.json()["code"] == "validation_error"
    fixed = client.post("/v1/predict", json=FEATURES, headers=keyed(one.headers, fixed_later))
    assert fixed.status_code == 200
    assert "Idempotent-Replayed" not in fixed.headers

    bad_key = client.post("/v1/predict", json=FEATURES, headers=keyed(one.headers, "x" * 256))
    assert bad_key.json()["code"] == "validation_error"


def test_an_admin_create_retried_creates_one_tenant(client: TestClient) -> None:
    headers = {**bearer(admin_token(client)), "Idempotency-Key": str(uuid.uuid4())}
    name = f"idem-{uuid.uuid4().hex[:8]}"
    first = client.post("/v1/admin/tenants", json={"name": name}, headers=headers)
    retry = client.post("/v1/admin/tenants", json={"name": name}, headers=headers)
    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.headers["Idempotent-Replayed"] == "true"
    tenants = client.get("/v1/admin/tenants", headers=headers).json()
    assert [t["name"] for t in tenants].count(name) == 1
    documented = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/admin/tenants", "/v1/predict", "/v1/predict/batch"):
        parameters = documented[path]["post"].get("parameters", [])
        assert "Idempotency-Key" in {p["name"] for p in parameters}, path


def test_an_answer_is_kept_for_the_ttl_only(make_settings: Callable[..., Settings]) -> None:
    with app_client(make_settings, idempotency_ttl_s=1) as client:
        customer = new_customer(client)
        headers = keyed(customer.headers, "short-lived")
        assert client.post("/v1/predict", json=FEATURES, headers=headers).status_code == 200
        time.sleep(1.2)
        later = client.post("/v1/predict", json=OTHER, headers=headers)
        assert later.status_code == 200
        assert "Idempotent-Replayed" not in later.headers


# With Redis for limits, the kept answers are in Redis too: the database plays no part here.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_across_workers_one_runs_the_rest_conflict_or_replay(
    database_url: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    env = server_env(
        database_url, model_dir, rate_limit_storage_uri=redis_url,
        microbatch_max_wait_us="100000",  # the first request stays in flight ~0.1 s
    )  # fmt: skip
    with live_server(env, tmp_path / "server.log", workers=2) as server:
        with server.client() as client:
            customer = new_customer(client, rate_limit="100000/minute")
        headers = keyed(customer.headers, f"race-{uuid.uuid4()}")
        answers: list[httpx.Response] = []

        def send() -> None:
            with server.client() as own:  # its own connection: either worker may take it
                answers.append(own.post("/v1/predict", json=FEATURES, headers=headers))

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        fresh = [
            a for a in answers if a.status_code == 200 and "Idempotent-Replayed" not in a.headers
        ]
        assert len(fresh) == 1
        others = {a.status_code for a in answers if a not in fresh}
        assert others <= {200, 409}
        conflicts = [a for a in answers if a.status_code == 409]
        assert all(a.json()["code"] == "idempotency_conflict" for a in conflicts)
        for _ in range(6):  # new connections, so both workers answer some
            with server.client() as own:
                retry = own.post("/v1/predict", json=FEATURES, headers=headers)
            assert retry.headers["Idempotent-Replayed"] == "true"
            assert retry.content == fresh[0].content
