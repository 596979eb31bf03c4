"""Monthly quotas and batch caps as customers meet them (issue 4, items 5 and 6).

A quota counts a tenant's predictions per calendar month (UTC); a request that would go over
gets 429 `quota_exceeded`. A batch over min(tenant cap, server cap) is refused with 422 before
any model work, and consumes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.limits.rate_limiter import QuotaSeed, RateLimiter
from tenants.usage.records import current_month
from tests.conftest import (
    FEATURES,
    LiveServer,
    admin_token,
    create_tenant,
    new_customer,
)
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
