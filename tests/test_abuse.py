"""Abuse resistance: invented keys cost no lookup, guessing addresses are throttled, legacy keys
keep working, and both rate-limit header families are on every answer after authentication.

The flood runs the real app (lifespan and all) in this test's event loop through
`httpx.ASGITransport`, which lets each client have its own address, and counts the statements
the app sends to its real database with a SQLAlchemy cursor event: no mocks.
"""

from __future__ import annotations

import asyncio
import secrets
import string
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from http_sfv.list import List as StructuredList
from sqlalchemy import event, text

from auth import keys
from service.config import DEV_API_KEY_PEPPER, Settings
from service.main import create_app
from service.resources import Resources
from tenants.database import make_engine
from tests.conftest import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    FEATURES,
    LiveServer,
    admin_token,
    bearer,
    create_tenant,
    issue_key,
    live_server,
    new_customer,
)

ATTACKER = ("203.0.113.7", 40000)
CUSTOMER = ("198.51.100.20", 40001)
_ALPHABET = string.digits + string.ascii_letters


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def legacy_token(key_id: str) -> str:
    """A key as issued before tags: `tsk_<12-char id>_<32-char secret><6-char CRC-32>`."""
    body = f"tsk_{key_id}_{_random(32)}"
    value, digits = zlib.crc32(body.encode()), []
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits.append(_ALPHABET[digit])
    return body + "".join(reversed(digits))


def invented_key(index: int) -> str:
    """What an attacker can make: a valid checksum, a made-up id; half tagged, half legacy."""
    if index % 2:
        return legacy_token(_random(12))
    return keys.generate("not the server's pepper").token


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[Resources]:
    async with app.router.lifespan_context(app):
        yield app.state.resources


def client_at(app: FastAPI, address: tuple[str, int]) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=address)
    return httpx.AsyncClient(transport=transport, base_url="http://tenantserve")


class KeyLookups:
    """Statements that read the api_keys table, as the database driver is handed them."""

    def __init__(self, resources: Resources) -> None:
        self.count = 0
        event.listen(resources.engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        statement: str = args[2]
        if "api_keys" in statement and statement.lstrip().upper().startswith("SELECT"):
            self.count += 1


async def _new_key(app: FastAPI) -> str:
    async with client_at(app, CUSTOMER) as http:
        signin = await http.post(
            "/v1/auth/token", data={"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
        )
        staff = bearer(signin.json()["access_token"])
        tenant = await http.post("/v1/admin/tenants", json={"name": "flooded"}, headers=staff)
        issued = await http.post(
            f"/v1/admin/tenants/{tenant.json()['id']}/keys", json={"name": "k"}, headers=staff
        )
        return str(issued.json()["key"])


async def _flood(
    app: FastAPI, resources: Resources, customer_key: str, invented: int
) -> tuple[Counter[int], Counter[int], int]:
    async with client_at(app, ATTACKER) as attacker, client_at(app, CUSTOMER) as legit:
        headers = {"X-API-Key": customer_key}
        assert (await legit.post("/v1/predict", json=FEATURES, headers=headers)).status_code == 200
        lookups = KeyLookups(resources)
        attack_answers: Counter[int] = Counter()
        legit_answers: Counter[int] = Counter()

        async def attack(worker: int) -> None:
            for index in range(worker, invented, 16):
                response = await attacker.post(
                    "/v1/predict", json=FEATURES, headers={"X-API-Key": invented_key(index)}
                )
                attack_answers[response.status_code] += 1

        async def use() -> None:
            for _ in range(100):
                response = await legit.post("/v1/predict", json=FEATURES, headers=headers)
                legit_answers[response.status_code] += 1

        await asyncio.gather(*(attack(worker) for worker in range(16)), use())
        return attack_answers, legit_answers, lookups.count


def test_invented_keys_cost_no_lookup_and_leave_customers_alone(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(auth_failure_limit="1000000/minute"))

    async def scenario() -> None:
        async with running(app) as resources:
            key = await _new_key(app)
            attack, legit, lookups = await _flood(app, resources, key, invented=2000)
            assert attack == {401: 2000}
            assert legit == {200: 100}
            assert lookups == 0, "an invented key reached the database"
            assert len(resources.keys) <= 1  # only the customer's key was cached

    asyncio.run(scenario())


def test_a_guessing_address_gets_429_before_any_check(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(auth_failure_limit="100/minute"))

    async def scenario() -> None:
        async with running(app) as resources:
            key = await _new_key(app)
            attack, legit, lookups = await _flood(app, resources, key, invented=2000)
            assert attack == {401: 100, 429: 1900}
            assert legit == {200: 100}
            assert lookups == 0
            async with client_at(app, ATTACKER) as attacker:
                # Even its valid key is refused now: the address is not checked key by key.
                refused = await attacker.get("/v1/usage", headers={"X-API-Key": key})
                assert refused.status_code == 429
                assert refused.json()["code"] == "rate_limited"
                assert int(refused.headers["Retry-After"]) >= 1
                metrics = (await attacker.get("/metrics")).text
                assert 'tenantserve_rejections_total{reason="auth_failures"}' in metrics

    asyncio.run(scenario())


def test_keys_issued_before_tags_still_work(
    make_settings: Callable[..., Settings], database_url: str
) -> None:
    settings = make_settings()
    with TestClient(create_app(settings)) as http:
        customer = new_customer(http)
    key_id = f"L{uuid.uuid4().hex[:11]}"
    token = legacy_token(key_id)
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO api_keys (id, tenant_id, name, key_hash, scopes, created_at)"
                " VALUES (:id, :tenant, 'legacy', :hash, 'predict usage:read', :now)"
            ),
            {
                "id": key_id,
                "tenant": customer.tenant["id"],
                "hash": keys.hash_key(token, DEV_API_KEY_PEPPER),
                "now": datetime.now(UTC).replace(tzinfo=None),
            },
        )
    engine.dispose()
    with TestClient(create_app(settings)) as http:  # a worker started after the key existed
        assert http.post("/v1/predict", json=FEATURES, headers={"X-API-Key": token}).is_success
        assert http.post("/v1/predict", json=FEATURES, headers=customer.headers).is_success
        forged = legacy_token(key_id)  # the right id, a wrong secret
        assert (
            http.post("/v1/predict", json=FEATURES, headers={"X-API-Key": forged}).status_code
            == 401
        )


def _from(server: LiveServer, peer: str) -> httpx.Client:
    """A client whose connections leave from `peer` (the whole of 127/8 is loopback)."""
    return server.client(transport=httpx.HTTPTransport(local_address=peer))


@pytest.mark.slow
def test_a_trusted_proxys_forwarded_address_is_the_one_throttled(
    model_dir: Path, tmp_path: Path
) -> None:
    env = {
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'tenantserve.db'}",
        "TENANTSERVE_MODEL_DIR": str(model_dir),
        "TENANTSERVE_AUTH_FAILURE_LIMIT": "5/minute",
        "TENANTSERVE_FORWARDED_ALLOW_IPS": "127.0.0.2",
    }
    guess = {"X-API-Key": invented_key(0)}
    with live_server(env, tmp_path / "server.log") as server:
        with server.client() as admin:
            customer = new_customer(admin)
        with _from(server, "127.0.0.2") as proxy, _from(server, "127.0.0.3") as untrusted:

            def via_proxy(forwarded: str, headers: dict[str, str]) -> int:
                sent = {**headers, "X-Forwarded-For": forwarded}
                return proxy.post("/v1/predict", json=FEATURES, headers=sent).status_code

            assert [via_proxy(ATTACKER[0], guess) for _ in range(6)] == [401] * 5 + [429]
            # The proxy's other callers, and the proxy itself, are not the flooding address.
            assert via_proxy(CUSTOMER[0], guess) == 401
            assert via_proxy(CUSTOMER[0], customer.headers) == 200
            direct = proxy.post("/v1/predict", json=FEATURES, headers=customer.headers)
            assert direct.status_code == 200

            # From a peer that is no trusted proxy the header is ignored: a new forwarded
            # address each time, yet the peer's own failures add up to the limit.
            answers = [
                untrusted.post(
                    "/v1/predict",
                    json=FEATURES,
                    headers={**guess, "X-Forwarded-For": f"192.0.2.{n}"},
                ).status_code
                for n in range(6)
            ]
            assert answers == [401] * 5 + [429]
    assert server.output().count('"event":"auth_failures_throttled"') == 2


def _items(field: str) -> dict[str, dict[str, Any]]:
    parsed = StructuredList()
    parsed.parse(field.encode())
    return {str(item.value): dict(item.params) for item in parsed}


@pytest.mark.parametrize("quota", [None, 1000])
def test_both_header_families_on_every_answer_after_authentication(
    client: TestClient, quota: int | None
) -> None:
    token = admin_token(client)
    tenant = create_tenant(client, token, rate_limit="5/minute", monthly_quota=quota)
    full = {"X-API-Key": issue_key(client, token, tenant["id"])["key"]}
    usage_only = {"X-API-Key": issue_key(client, token, tenant["id"], scopes=["usage:read"])["key"]}
    answers = {
        200: client.post("/v1/predict", json=FEATURES, headers=full),
        422: client.post("/v1/predict", json={**FEATURES, "petal_width": -1}, headers=full),
        403: client.post("/v1/predict", json=FEATURES, headers=usage_only),
    }
    for _ in range(5):
        last = client.post("/v1/predict", json=FEATURES, headers=full)
    answers[429] = last
    for status, response in answers.items():
        assert response.status_code == status, response.text
        assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(
            response.headers
        )
        policy = _items(response.headers["RateLimit-Policy"])
        state = _items(response.headers["RateLimit"])
        assert policy["key"] == {"q": 5, "w": 60}
        assert state["key"]["r"] == int(response.headers["X-RateLimit-Remaining"])
        assert 0 <= state["key"]["t"] <= 60
        if quota is None:
            assert set(policy) == set(state) == {"key"}
        else:
            assert policy["quota"] == {"q": quota}
    if quota is not None:
        # What each answer's request saw left: after the first prediction (the 422 and the 403
        # serving none), then after the three more the key's limit of 5 let through.
        left = {200: quota - 1, 422: quota - 1, 403: quota - 1, 429: quota - 4}
        for status, response in answers.items():
            state = _items(response.headers["RateLimit"])
            assert state["quota"]["r"] == left[status], status
            assert 0 < state["quota"]["t"] <= 31 * 86400


def test_numbers_beyond_the_database_are_422_and_renames_onto_a_name_are_409(
    client: TestClient,
) -> None:
    token = admin_token(client)
    huge = {"name": "huge", "monthly_quota": 1706737351356338667520}
    assert client.post("/v1/admin/tenants", json=huge, headers=bearer(token)).status_code == 422
    at_most = {"name": "int32", "monthly_quota": 2_147_483_647}
    assert client.post("/v1/admin/tenants", json=at_most, headers=bearer(token)).status_code == 201
    first, second = create_tenant(client, token), create_tenant(client, token)
    renamed = client.patch(
        f"/v1/admin/tenants/{second['id']}", json={"name": first["name"]}, headers=bearer(token)
    )
    assert renamed.status_code == 409 and renamed.json()["code"] == "conflict"
    for bad in ("10 per minute", "0/minute", "5/fortnight", "1/minute\n"):
        answer = client.post(
            "/v1/admin/tenants", json={"name": "x", "rate_limit": bad}, headers=bearer(token)
        )
        assert answer.status_code == 422, bad


def test_values_no_column_can_hold_are_422_not_500(client: TestClient) -> None:
    """What the fuzzer found: moments that leave the years 1-9999 once in UTC, and NUL
    characters, which PostgreSQL text cannot hold (SQLite can: both databases run this)."""
    customer = new_customer(client)
    staff = bearer(customer.token)
    tenant = customer.tenant["id"]
    year_zero = {"from": "0001-01-01T00:00:00+01:00"}
    refused = [
        client.get("/v1/audit/usage", params=year_zero, headers=staff),
        client.get(
            "/v1/audit/usage/export", params={"to": "9999-12-31T23:59:59-01:00"}, headers=staff
        ),
        client.get("/v1/usage", params=year_zero, headers=customer.headers),
        client.get("/v1/audit/usage/summary", params={"path": "/v1/\x00"}, headers=staff),
        client.get("/v1/audit/usage/export", params={"tenant_id": "\x00"}, headers=staff),
        client.post("/v1/admin/tenants", json={"name": "a\x00b"}, headers=staff),
        client.post("/v1/admin/tenants", json={"name": "   "}, headers=staff),
        client.post(
            f"/v1/admin/tenants/{tenant}/keys",
            json={"name": "k", "expires_at": "9999-12-31T23:59:59-01:00"},
            headers=staff,
        ),
        client.post("/v1/auth/token", data={"username": "ad\x00min", "password": "x" * 12}),
    ]
    for response in refused:
        assert response.status_code == 422, (response.request.url, response.text)
        assert response.json()["code"] == "validation_error"
    # An id no tenant has: SQLite looks and finds none, PostgreSQL refuses to look.
    assert client.get("/v1/admin/tenants/%00", headers=staff).status_code in (404, 422)
    assert client.get("/v1/usage", headers=customer.headers).status_code == 200
