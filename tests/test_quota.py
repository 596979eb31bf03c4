"""Monthly quotas and batch caps as customers meet them (issue 4, items 5 and 6).

A quota counts a tenant's predictions per calendar month (UTC); a request that would go over
gets 429 `quota_exceeded`. A batch over min(tenant cap, server cap) is refused with 422 before
any model work, and consumes nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.config import Settings
from service.limits.quota import HOLD_MARGIN
from service.limits.rate_limiter import QuotaSeed, RateLimiter
from tenants.usage.records import current_month
from tests.conftest import (
    FEATURES,
    LiveServer,
    admin_token,
    create_tenant,
    issue_key,
    live_server,
    new_customer,
    server_env,
    wait_for,
)
from tests.test_http_protocol import _request, _Wire
from tests.test_rate_limits import (
    PROBLEM,
    CuttableProxy,
    app_client,
    burst,
    poll,
    redis_proxy,  # noqa: F401 (a fixture)
    wait_for_shared_limits,
)


def batch(size: int) -> dict[str, Any]:
    return {"items": [FEATURES] * size}


def predict_batch(
    client: httpx.Client | TestClient, headers: dict[str, str], size: int
) -> httpx.Response:
    response: httpx.Response = client.post("/v1/predict/batch", json=batch(size), headers=headers)
    return response


def seconds_to_next_month() -> float:
    now = datetime.now(UTC)
    start = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return (start - now).total_seconds()


def assert_quota_exceeded(response: httpx.Response) -> None:
    """A 429 as the contract shapes it, retrying when the month turns."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "quota_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= seconds_to_next_month() + 5


def quota_once_recorded(
    client: httpx.Client | TestClient, headers: dict[str, str], used: int
) -> dict[str, Any]:
    """The tenant's quota from `GET /v1/usage`, once `used` predictions are written."""

    def quota() -> dict[str, Any]:
        response = client.get("/v1/usage", headers=headers)
        assert response.status_code == 200, response.text
        return dict(response.json()["quota"])

    return poll(quota, lambda q: q["used"] >= used)


# In-process: SQLite and PostgreSQL


def test_a_request_that_would_exceed_the_quota_gets_429(client: TestClient) -> None:
    tenant = create_tenant(client, admin_token(client), monthly_quota=5)
    customer = new_customer(client, tenant=tenant)
    assert predict_batch(client, customer.headers, 3).status_code == 200
    # 6 > 5: refused whole, not served in part.
    assert_quota_exceeded(predict_batch(client, customer.headers, 3))
    assert predict_batch(client, customer.headers, 2).status_code == 200
    assert_quota_exceeded(client.post("/v1/predict", json=FEATURES, headers=customer.headers))
    assert quota_once_recorded(client, customer.headers, 5) == {
        "monthly_limit": 5,
        "used": 5,
        "remaining": 0,
    }


def test_a_batch_over_the_tenant_cap_is_refused_before_any_prediction(
    client: TestClient,
) -> None:
    tenant = create_tenant(client, admin_token(client), max_batch_size=3, monthly_quota=4)
    customer = new_customer(client, tenant=tenant)
    refused = predict_batch(client, customer.headers, 4)
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "validation_error"
    assert refused.json()["errors"][0]["loc"] == ["body", "items"]
    # Nothing of the quota went to the refused batch: all four are still there.
    assert predict_batch(client, customer.headers, 3).status_code == 200
    assert client.post("/v1/predict", json=FEATURES, headers=customer.headers).status_code == 200
    assert quota_once_recorded(client, customer.headers, 4)["used"] == 4


def test_the_server_cap_applies_when_smaller_than_the_tenants(
    make_settings: Callable[..., Settings],
) -> None:
    with app_client(make_settings, max_batch_size=2) as client:
        tenant = create_tenant(client, admin_token(client), max_batch_size=50)
        customer = new_customer(client, tenant=tenant)
        refused = predict_batch(client, customer.headers, 3)
        served = predict_batch(client, customer.headers, 2)
    assert refused.status_code == 422
    assert "at most 2 items" in refused.json()["errors"][0]["msg"]
    assert served.status_code == 200
    assert len(served.json()["predictions"]) == 2


def test_the_quota_holds_across_a_redis_outage(
    make_settings: Callable[..., Settings],
    redis_proxy: tuple[CuttableProxy, str],  # noqa: F811
) -> None:
    proxy, through_proxy = redis_proxy
    with app_client(make_settings, rate_limit_storage_uri=through_proxy) as client:
        tenant = create_tenant(client, admin_token(client), monthly_quota=10)
        customer = new_customer(client, tenant=tenant)
        assert predict_batch(client, customer.headers, 3).status_code == 200  # counted in Redis
        proxy.cut()
        # Counted in this process alone: Redis never hears of these four.
        assert predict_batch(client, customer.headers, 4).status_code == 200
        proxy.restore()
        wait_for_shared_limits(client, customer.headers)
        # Back on Redis, all seven count: three are left, not seven.
        assert predict_batch(client, customer.headers, 3).status_code == 200
        assert_quota_exceeded(predict_batch(client, customer.headers, 1))


def quota_left(response: httpx.Response) -> int | None:
    """What the `"quota"` item of the response's `RateLimit` field says is left, if it has one."""
    for item in response.headers["RateLimit"].split(","):
        name, *parameters = item.strip().split(";")
        if name == '"quota"':
            return int(dict(p.split("=") for p in parameters)["r"])
    return None


HOLDING = HOLD_MARGIN + 1000  # the margin, and the servers' batch cap (their default)
"""Left of a quota beyond which a single prediction's quota is held with its rate limit."""


def test_requests_that_serve_no_prediction_leave_the_quota_whole(client: TestClient) -> None:
    """A single prediction's quota is held from its rate limit on, before its body is read:
    whatever then ends without a prediction gives it back, and says what was left before it."""
    token = admin_token(client)
    tenant = create_tenant(client, token, monthly_quota=HOLDING + 40)
    customer = new_customer(client, token, tenant=tenant)
    usage_only = issue_key(client, token, tenant["id"], scopes=["usage:read"])
    first = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
    assert first.status_code == 200 and quota_left(first) == HOLDING + 39
    once = {**customer.headers, "Idempotency-Key": "quota-replay"}
    assert client.post("/v1/predict", json=FEATURES, headers=once).status_code == 200
    unserved = [
        client.post("/v1/predict", json={**FEATURES, "sepal_length": -1}, headers=customer.headers),
        client.post("/v1/predict", content=b"{", headers=customer.headers),
        client.post("/v1/predict", json=FEATURES, headers=once),  # the replay
        client.post("/v1/predict", json=FEATURES, headers={"X-API-Key": usage_only["key"]}),
    ]
    assert [r.status_code for r in unserved] == [422, 422, 200, 403]
    assert [quota_left(r) for r in unserved] == [HOLDING + 38] * 4
    assert quota_left(client.get("/v1/usage", headers=customer.headers)) == HOLDING + 38
    third = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
    assert third.status_code == 200 and quota_left(third) == HOLDING + 37
    # Near the end, where every request is decided after its validation: exact to the last.
    assert predict_batch(client, customer.headers, 1000).status_code == 200
    assert predict_batch(client, customer.headers, 1000).status_code == 200
    assert predict_batch(client, customer.headers, HOLDING + 37 - 2000).status_code == 200
    assert_quota_exceeded(client.post("/v1/predict", json=FEATURES, headers=customer.headers))
    assert quota_once_recorded(client, customer.headers, HOLDING + 40)["remaining"] == 0


def test_a_hold_that_cannot_be_given_back_still_gets_its_answer(
    model_dir: Path,
    tmp_path: Path,
    shared_redis: str,
    redis_proxy: tuple[CuttableProxy, str],  # noqa: F811
) -> None:
    """Redis goes away while a request holds its quota, with strict limits on: the invalid body
    still gets its 422 (the hold cannot go back, a loss of one prediction for the tenant), not
    a dropped connection or an unhandled error."""
    proxy, through_proxy = redis_proxy
    env = server_env(
        f"sqlite:///{tmp_path / 'tenantserve.db'}", model_dir,
        rate_limit_storage_uri=through_proxy, rate_limit_strict="true",
    )  # fmt: skip
    with live_server(env, tmp_path / "server.log") as server:
        with server.client() as client:
            tenant = create_tenant(client, admin_token(client), monthly_quota=HOLDING + 10)
            headers = new_customer(client, tenant=tenant).headers
            assert client.post("/v1/predict", json=FEATURES, headers=headers).status_code == 200
        counter = f"tenantserve:quota:{tenant['id']}:{current_month(time.time()).label}"
        store = redis.Redis.from_url(shared_redis)
        body = json.dumps({**FEATURES, "sepal_width": 0}).encode()
        wire = _Wire(server)
        try:
            # The head alone: the request is admitted (and holds its prediction), then waits
            # for its body.
            head = _request("POST", "/v1/predict", headers=headers, body=body)[: -len(body)]
            relayed = proxy.relayed
            wire.send(head)
            # Held in Redis, and the server has read Redis's answer: cutting now cannot fail
            # the admission itself.
            wait_for(
                lambda: store.get(counter) == b"2" and proxy.relayed > relayed and proxy.all_read(),
                within=10,
            )
            proxy.cut()
            wire.send(body)
            status, answer = wire.response()
        finally:
            wire.close()
            store.close()
        assert status == 422, answer
        assert json.loads(answer)["code"] == "validation_error"
        assert "unhandled_error" not in server.output()


# A live server: two workers sharing the quota through Redis (PostgreSQL)


@pytest.fixture
def server(two_workers: LiveServer) -> LiveServer:
    return two_workers


def quota_customer(server: LiveServer, quota: int) -> dict[str, str]:
    """A tenant with this quota and a key whose rate limit never gets in the way."""
    with server.client() as client:
        tenant = create_tenant(client, admin_token(client), monthly_quota=quota)
        return new_customer(client, tenant=tenant, rate_limit="10000/minute").headers


def test_concurrent_batches_stop_exactly_at_the_quota(server: LiveServer) -> None:
    headers = quota_customer(server, 60)
    answers = burst([server], headers, [batch(5)] * 24, path="/v1/predict/batch")
    assert len({answer.worker for answer in answers}) == 2, "both workers should take batches"
    served = [len(a.response.json()["predictions"]) for a in answers if a.status == 200]
    assert sum(served) == 60
    for answer in answers:
        if answer.status != 200:
            assert_quota_exceeded(answer.response)
    with server.client() as client:
        assert quota_once_recorded(client, headers, 60) == {
            "monthly_limit": 60,
            "used": 60,
            "remaining": 0,
        }


def mixed_burst(server: LiveServer, headers: dict[str, str], valid: int) -> int:
    """`valid` single predictions and half as many invalid ones, all at once on both workers:
    how many were served. Each invalid one is a 422 (never a 429), each valid one served or
    refused for the quota."""
    invalid = {**FEATURES, "petal_width": "wide"}
    bodies = [FEATURES, FEATURES, invalid] * (valid // 2)
    answers = burst([server], headers, bodies)
    assert len({answer.worker for answer in answers}) == 2, "both workers should take some"
    for answer, body in zip(answers, bodies, strict=True):
        if body is invalid:
            assert answer.status == 422, answer.response.text
        elif answer.status != 200:
            assert_quota_exceeded(answer.response)
    return sum(answer.status == 200 for answer in answers)


def test_single_predictions_across_workers_stop_exactly_at_the_quota(server: LiveServer) -> None:
    """Where the quota is held with the rate limit, across into where it is decided after
    validation, then at its very end: exact, and nothing taken by the invalid requests."""
    quota = HOLDING + 20  # held while 20 or fewer are used
    headers = quota_customer(server, quota)
    with server.client() as client:  # the month's counter, now in Redis
        assert client.post("/v1/predict", json=FEATURES, headers=headers).status_code == 200
    assert mixed_burst(server, headers, 40) == 40
    with server.client() as client:
        for _ in range(2):
            assert predict_batch(client, headers, 1000).status_code == 200
    assert mixed_burst(server, headers, 20) == quota - 41 - 2000
    with server.client() as client:
        assert quota_once_recorded(client, headers, quota)["remaining"] == 0


def test_batches_of_mixed_sizes_never_overshoot_and_the_rest_can_be_used(
    server: LiveServer,
) -> None:
    headers = quota_customer(server, 100)
    sizes = [3, 4, 5, 6, 7, 8, 9] * 4  # 168 predictions asked for at once
    answers = burst([server], headers, [batch(n) for n in sizes], path="/v1/predict/batch")
    served = sum(len(a.response.json()["predictions"]) for a in answers if a.status == 200)
    assert 100 - max(sizes) < served <= 100
    with server.client() as client:
        # What is left still serves, one prediction at a time, up to the last one.
        while served < 100:
            response = client.post("/v1/predict", json=FEATURES, headers=headers)
            assert response.status_code == 200, response.text
            served += 1
        assert_quota_exceeded(client.post("/v1/predict", json=FEATURES, headers=headers))
        assert quota_once_recorded(client, headers, 100)["used"] == 100


def _month_of_requests(uri: str, seed: QuotaSeed, requests: int) -> list[Any]:
    """`requests` predictions of one tenant arriving together at a fresh limiter: what each
    was counted as (or the exception it got)."""

    async def month() -> list[Any]:
        limiter = RateLimiter(uri, strict=True)
        try:
            return await asyncio.gather(
                *(limiter.consume_quota("acme:2026-12", 1, 1000, seed) for _ in range(requests)),
                return_exceptions=True,
            )
        finally:
            await limiter.close()

    return asyncio.run(month())


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_a_counter_is_seeded_once_however_many_requests_find_it_unseeded(
    storage: str, request: pytest.FixtureRequest
) -> None:
    """The database is asked for the month's count once per process, not once per request
    that arrives while it is being asked (a new month's first second of a busy tenant)."""
    uri = "memory://" if storage == "memory" else request.getfixturevalue("redis_url")
    asked = []

    async def count_in_the_database() -> int:
        asked.append(1)
        await asyncio.sleep(0.05)
        return 10

    counted = _month_of_requests(uri, count_in_the_database, 50)
    assert len(asked) == 1
    assert sorted(counted) == list(range(11, 61))  # every one counted, on top of the 10


def test_a_seed_that_failed_is_tried_again_by_the_next_request() -> None:
    outcomes: Iterator[Exception | int] = iter([ConnectionError("database unreachable"), 10])

    async def count_in_the_database() -> int:
        await asyncio.sleep(0.01)
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def two_requests() -> list[Any]:
        limiter = RateLimiter("memory://", strict=True)
        first = await asyncio.gather(
            limiter.consume_quota("acme:2026-12", 1, 1000, count_in_the_database),
            return_exceptions=True,
        )
        second = await limiter.consume_quota("acme:2026-12", 1, 1000, count_in_the_database)
        await limiter.close()
        return [*first, second]

    failed, counted = asyncio.run(two_requests())
    assert isinstance(failed, ConnectionError) and counted == 11


@pytest.mark.parametrize(
    ("instant", "label", "ends"),
    [
        (
            datetime(2026, 12, 31, 23, 59, 59, 999999, UTC),
            "2026-12",
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (datetime(2027, 1, 1, tzinfo=UTC), "2027-01", datetime(2027, 2, 1, tzinfo=UTC)),
        (datetime(2028, 2, 29, 12, tzinfo=UTC), "2028-02", datetime(2028, 3, 1, tzinfo=UTC)),
        (datetime(2026, 12, 3, 15, tzinfo=UTC), "2026-12", datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
def test_the_quota_month_turns_at_midnight_utc_on_the_first(
    instant: datetime, label: str, ends: datetime
) -> None:
    """The month a quota counts, made once a month and kept: each instant, asked in an order
    that turns the month back and forth, gets its own."""
    month = current_month(instant.timestamp())
    assert month.label == label
    assert month.start == instant.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    seconds_left = month.seconds_left(instant.timestamp())
    assert seconds_left == pytest.approx((ends - instant).total_seconds(), abs=1e-5)
