"""Staff of one tenant see and change only that tenant: everything of another tenant is 404.

Route by route, on both databases: each request a tenant-scoped admin or auditor might aim at
another tenant's objects is refused as if the object did not exist, and the same request aimed
at their own tenant succeeds (so the 404 is the scoping, not a malformed request).
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import (
    FEATURES,
    STAFF_PASSWORD,
    Customer,
    admin_token,
    audit_events,
    bearer,
    create_tenant,
    new_customer,
    new_staff,
    wait_for,
)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, str] | None = None
    body: dict[str, Any] | None = None

    def send(self, client: TestClient, token: str) -> Any:
        return client.request(
            self.method, self.path, params=self.params, json=self.body, headers=bearer(token)
        )


# Every request that names a tenant or a key, as (route template, request for that tenant/key).
# Ordered so that running them all against one's own tenant works: rotate before revoke.
AdminCall = Callable[[str, str], Call]
ADMIN_CALLS: dict[tuple[str, str], AdminCall] = {
    ("GET", "/v1/admin/tenants/{tenant_id}"): lambda t, k: Call("GET", f"/v1/admin/tenants/{t}"),
    ("PATCH", "/v1/admin/tenants/{tenant_id}"): lambda t, k: Call(
        "PATCH", f"/v1/admin/tenants/{t}", body={"name": f"renamed-{t}"}
    ),
    ("GET", "/v1/admin/tenants/{tenant_id}/keys"): lambda t, k: Call(
        "GET", f"/v1/admin/tenants/{t}/keys"
    ),
    ("POST", "/v1/admin/tenants/{tenant_id}/keys"): lambda t, k: Call(
        "POST", f"/v1/admin/tenants/{t}/keys", body={"name": "planted"}
    ),
    ("POST", "/v1/admin/keys/{key_id}/rotate"): lambda t, k: Call(
        "POST", f"/v1/admin/keys/{k}/rotate", body={"grace_seconds": 0}
    ),
    ("POST", "/v1/admin/keys/{key_id}/revoke"): lambda t, k: Call(
        "POST", f"/v1/admin/keys/{k}/revoke"
    ),
    ("POST", "/v1/admin/users"): lambda t, k: Call(
        "POST",
        "/v1/admin/users",
        body={
            "username": f"planted-{uuid.uuid4().hex[:8]}",
            "password": STAFF_PASSWORD,
            "role": "admin",
            "tenant_id": t,
        },
    ),
}


def _usage_of(path: str) -> AdminCall:
    return lambda t, k: Call("GET", path, params={"tenant_id": t})


AUDIT_CALLS: dict[tuple[str, str], AdminCall] = {
    ("GET", path): _usage_of(path)
    for path in ("/v1/audit/usage", "/v1/audit/usage/summary", "/v1/audit/usage/export")
}


@dataclass
class TwoTenants:
    platform: str
    """A platform admin's token."""
    own: Customer
    other: Customer
    admin: str
    """A token of an admin of `own` only."""
    auditor: str
    """A token of an auditor of `own` only."""

    @property
    def scoped_staff(self) -> dict[str, str]:
        return {"tenant admin": self.admin, "tenant auditor": self.auditor}


def two_tenants(client: TestClient) -> TwoTenants:
    """Two tenants with a key each and some usage; staff of the first one only."""
    platform = admin_token(client)
    own, other = new_customer(client, platform), new_customer(client, platform)
    admin = new_staff(client, platform, role="admin", tenant_id=own.tenant["id"])[1]
    auditor = new_staff(client, platform, role="auditor", tenant_id=own.tenant["id"])[1]
    for customer in (own, other):
        response = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
        assert response.status_code == 200, response.text
    wait_for(lambda: len(usage_items(client, platform)) == 2, within=2.0)
    return TwoTenants(platform, own, other, admin, auditor)


def usage_items(client: TestClient, token: str, **params: str) -> list[dict[str, Any]]:
    response = client.get("/v1/audit/usage", params=params, headers=bearer(token))
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def openapi_routes_naming_tenants_or_keys(client: TestClient) -> set[tuple[str, str]]:
    """Every documented route with a `tenant_id` or `key_id` parameter, in path or query."""
    routes = set()
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        for method, operation in operations.items():
            names = {p["name"] for p in operation.get("parameters", [])}
            if names & {"tenant_id", "key_id"}:
                routes.add((method.upper(), path))
    return routes


def test_every_route_naming_a_tenant_or_key_is_covered(client: TestClient) -> None:
    covered = set(ADMIN_CALLS) | set(AUDIT_CALLS)
    missing = openapi_routes_naming_tenants_or_keys(client) - covered
    assert not missing, f"add these routes to the scoping tables: {sorted(missing)}"


def test_a_tenant_admin_cannot_lift_limits_or_a_suspension(client: TestClient) -> None:
    token = admin_token(client)
    tenant = create_tenant(client, token)
    _, own_admin = new_staff(client, token, role="admin", tenant_id=tenant["id"])
    for change in ({"status": "active"}, {"rate_limit": "1000/second"}, {"monthly_quota": 10**9}):
        response = client.patch(
            f"/v1/admin/tenants/{tenant['id']}", json=change, headers=bearer(own_admin)
        )
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "forbidden"


def test_other_tenants_objects_are_404_route_by_route(client: TestClient) -> None:
    world = two_tenants(client)
    other_tenant, other_key = world.other.tenant["id"], world.other.key["id"]
    aimed = [(world.admin, make(other_tenant, other_key)) for make in ADMIN_CALLS.values()]
    aimed += [
        (token, make(other_tenant, other_key))
        for token in world.scoped_staff.values()
        for make in AUDIT_CALLS.values()
    ]
    wrong = []
    for token, call in aimed:
        response = call.send(client, token)
        if response.status_code != 404 or response.json()["code"] != "not_found":
            wrong.append(f"{call.method} {call.path} {call.params or ''}: {response.status_code}")
    assert not wrong, "\n".join(wrong)

    # None of it took effect: the other tenant is as it was.
    assert client.post("/v1/predict", json=FEATURES, headers=world.other.headers).is_success
    tenant = client.get(f"/v1/admin/tenants/{other_tenant}", headers=bearer(world.platform))
    assert tenant.json() == world.other.tenant
    keys = client.get(f"/v1/admin/tenants/{other_tenant}/keys", headers=bearer(world.platform))
    assert [k["id"] for k in keys.json()] == [other_key]

    # The same requests at their own tenant are fine: the 404s above were the scoping.
    own_tenant, own_key = world.own.tenant["id"], world.own.key["id"]
    for make in ADMIN_CALLS.values():
        response = make(own_tenant, own_key).send(client, world.admin)
        assert response.is_success, response.text
    for token in world.scoped_staff.values():
        for make in AUDIT_CALLS.values():
            assert make(own_tenant, own_key).send(client, token).status_code == 200


def test_scoped_staff_see_only_their_tenant(client: TestClient) -> None:
    world = two_tenants(client)
    own, other = world.own, world.other
    listed = client.get("/v1/admin/tenants", headers=bearer(world.admin))
    assert [t["id"] for t in listed.json()] == [own.tenant["id"]]

    other_ids = {other.tenant["id"], other.key["id"]}
    for who, token in world.scoped_staff.items():
        events = audit_events(client, token)
        assert {e["target"] for e in events} & other_ids == set(), who
        assert {own.tenant["id"], own.key["id"]} <= {e["target"] for e in events}, who

        items = usage_items(client, token)
        assert {r["tenant_id"] for r in items} == {own.tenant["id"]}, who
        # Another tenant's key filters to nothing, exactly as a key id that does not exist.
        assert usage_items(client, token, key_id=other.key["id"]) == []

        summary = client.get(
            "/v1/audit/usage/summary", params={"group_by": "tenant"}, headers=bearer(token)
        )
        assert [g["group"] for g in summary.json()["groups"]] == [own.tenant["id"]], who

        export = client.get("/v1/audit/usage/export", headers=bearer(token))
        assert export.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(export.text)))
        assert rows and {r["tenant_id"] for r in rows} == {own.tenant["id"]}, who


def test_tenant_admins_cannot_act_for_the_platform(client: TestClient) -> None:
    world = two_tenants(client)
    platform_wide = [
        Call("POST", "/v1/admin/tenants", body={"name": "a tenant of my own"}),
        Call("POST", "/v1/admin/models/v1-forest/activate"),
        Call(
            "POST",
            "/v1/admin/users",
            body={"username": "platform-wannabe", "password": STAFF_PASSWORD, "role": "admin"},
        ),
    ]
    for call in platform_wide:
        response = call.send(client, world.admin)
        assert response.status_code == 403, f"{call.method} {call.path}: {response.text}"
        assert response.json()["code"] == "forbidden"
    tenants = client.get("/v1/admin/tenants", headers=bearer(world.platform)).json()
    assert len(tenants) == 2
    events = audit_events(client, world.platform)
    assert "model.activate" not in {e["action"] for e in events}
    assert "platform-wannabe" not in json.dumps(events)
