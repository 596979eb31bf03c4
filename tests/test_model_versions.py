"""Model versions per tenant: pins, staged rollouts, and what each answer says computed it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.serving.holder import ModelHolder
from service.serving.runtime import LoadedModel
from tests.conftest import (
    FEATURES,
    Customer,
    LiveServer,
    admin_token,
    bearer,
    new_customer,
    wait_for,
)

FOREST, LOGREG = "v1-forest", "v2-logreg"  # LOGREG is the default: the newest


def version_of(client: httpx.Client | TestClient, customer: Customer) -> str:
    response = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def patch(client: httpx.Client | TestClient, token: str, tenant: str, **fields: object) -> None:
    response = client.patch(f"/v1/admin/tenants/{tenant}", json=fields, headers=bearer(token))
    assert response.status_code == 200, response.text


def test_pinning_is_checked_and_only_for_platform_admins(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings())) as client:
        customer = new_customer(client)
        tenant = customer.tenant["id"]
        unknown = client.patch(
            f"/v1/admin/tenants/{tenant}", json={"model_version": "v9"},
            headers=bearer(customer.token),
        )  # fmt: skip
        assert unknown.status_code == 422
        assert unknown.json()["errors"][0]["loc"] == ["body", "model_version"]
        scoped = client.post(
            "/v1/admin/users",
            json={"username": "own-admin", "password": "a long enough password",
                  "role": "admin", "tenant_id": tenant},
            headers=bearer(customer.token),
        )  # fmt: skip
        assert scoped.status_code == 201
        own_token = admin_token(client, "own-admin", "a long enough password")
        for fields in ({"model_version": FOREST}, {"allow_version_choice": True}):
            refused = client.patch(
                f"/v1/admin/tenants/{tenant}", json=fields, headers=bearer(own_token)
            )
            assert refused.status_code == 403, refused.text


def test_a_rollout_moves_a_stable_half_of_the_unpinned_tenants(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings())) as client:
        token = admin_token(client)
        customers = [new_customer(client, token) for _ in range(200)]
        pinned = customers[0]
        patch(client, token, pinned.tenant["id"], model_version=LOGREG)

        def served() -> dict[str, str]:
            return {c.tenant["id"]: version_of(client, c) for c in customers}

        def roll_out(percent: int) -> dict[str, object]:
            response = client.post(
                f"/v1/admin/models/{FOREST}/rollout", json={"percent": percent},
                headers=bearer(token),
            )  # fmt: skip
            assert response.status_code == 200, response.text
            return dict(response.json())

        assert set(served().values()) == {LOGREG}
        state = roll_out(50)
        assert state["active"] == LOGREG
        assert state["rollout"] == {"version": FOREST, "percent": 50}
        first = served()
        moved = {tenant for tenant, version in first.items() if version == FOREST}
        assert 70 <= len(moved) <= 130, len(moved)  # about half of 199 unpinned tenants
        assert pinned.tenant["id"] not in moved, "a pinned tenant never moves"
        assert served() == first, "the same tenants every time"
        wider = roll_out(80)
        assert wider["rollout"] == {"version": FOREST, "percent": 80}
        assert moved <= {t for t, v in served().items() if v == FOREST}, "nobody moves back"

        everyone = roll_out(100)  # the same as activating it
        assert everyone["active"] == FOREST and everyone["rollout"] is None
        counts = Counter(served().values())
        assert counts == {FOREST: 199, LOGREG: 1}

        events = client.get("/v1/audit/events", headers=bearer(token)).json()["items"]
        assert {"model.rollout"} <= {e["action"] for e in events}


@pytest.mark.slow
def test_pinned_tenants_on_two_workers_each_get_and_are_billed_their_version(
    two_workers: LiveServer,
) -> None:
    server = two_workers
    with server.client() as http:
        token = admin_token(http)
        forest, logreg = new_customer(http, token), new_customer(http, token)
        patch(http, token, forest.tenant["id"], model_version=FOREST)
        patch(http, token, logreg.tenant["id"], model_version=LOGREG)
        wait_for(lambda: version_of(http, forest) == FOREST, within=1.0)
        wait_for(lambda: version_of(http, logreg) == LOGREG, within=1.0)

        def predict(customer: Customer) -> tuple[str, str]:
            with server.client() as own:  # a connection each: both workers answer
                answer = own.post("/v1/predict", json=FEATURES, headers=customer.headers)
            return customer.tenant["id"], answer.json()["model_version"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(predict, [forest, logreg] * 40))
        expected = {forest.tenant["id"]: FOREST, logreg.tenant["id"]: LOGREG}
        assert all(version == expected[tenant] for tenant, version in answers)

        def billed(customer: Customer) -> set[str | None]:
            records = http.get(
                "/v1/audit/usage", params={"tenant_id": customer.tenant["id"], "limit": 1000},
                headers=bearer(token),
            ).json()["items"]  # fmt: skip
            return {r["model_version"] for r in records if r["path"] == "/v1/predict"}

        wait_for(lambda: billed(forest) == {FOREST} and billed(logreg) == {LOGREG}, within=2.0)

        # Unpinned, the tenant follows the platform again, on every worker within a second.
        platform = http.get("/v1/admin/models", headers=bearer(token)).json()["active"]
        patch(http, token, forest.tenant["id"], model_version=None)
        wait_for(
            lambda: {v for _, v in (predict(forest) for _ in range(6))} == {platform}, within=1.0
        )


def test_the_activating_worker_serves_the_new_version_from_its_answer_on(
    make_settings: Callable[..., Settings],
) -> None:
    # A poll of the control row that lands between this worker's switch and its commit reads
    # the row as it was: it must not switch the worker back.
    with TestClient(create_app(make_settings(state_poll_interval_ms=50))) as client:
        token = admin_token(client)
        customer = new_customer(client, token)
        served = []
        for round_ in range(40):
            version = (FOREST, LOGREG)[round_ % 2]
            activated = client.post(f"/v1/admin/models/{version}/activate", headers=bearer(token))
            assert activated.status_code == 200, activated.text
            served += [(version, version_of(client, customer)) for _ in range(5)]
    assert [pair for pair in served if pair[0] != pair[1]] == []


def test_a_version_asked_for_by_many_requests_at_once_is_loaded_once(model_dir: Path) -> None:
    """The first requests pinned to a version the worker has not loaded share one load: one
    copy of the model in memory, not one a request."""
    holder = ModelHolder.load(model_dir, "v2-logreg", max_loaded=4, intra_op_threads=1)

    async def many_at_once() -> list[LoadedModel]:
        return await asyncio.gather(*(holder.preload("v1-forest") for _ in range(10)))

    loaded = asyncio.run(many_at_once())
    assert {model.version for model in loaded} == {"v1-forest"}
    assert len({id(model) for model in loaded}) == 1
