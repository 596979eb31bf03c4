"""Staff sign-in and what a staff token allows, as admins, auditors and forgers see it."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi.testclient import TestClient
from jose import jwt

from service.config import Settings
from service.main import create_app
from tests.conftest import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    FEATURES,
    STAFF_PASSWORD,
    admin_token,
    api_routes,
    audit_events,
    bearer,
    create_tenant,
    new_customer,
    new_staff,
    stored_rows,
)

SIGN_IN = "/v1/auth/token"
OTHER_SECRET = "a-secret-that-is-not-the-servers-0123456789"


def sign_in(client: TestClient, username: str, password: str) -> httpx.Response:
    return client.post(SIGN_IN, data={"username": username, "password": password})


def assert_refused_token(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "invalid_credentials"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def server_secret(client: TestClient) -> str:
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    return settings.jwt_secret.get_secret_value()


def test_sign_in_returns_a_short_lived_bearer_token(client: TestClient) -> None:
    response = sign_in(client, ADMIN_USERNAME, ADMIN_PASSWORD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    claims = jwt.get_unverified_claims(body["access_token"])
    assert claims["role"] == "admin" and claims["tenant_id"] is None
    assert claims["exp"] - claims["iat"] == 900
    assert claims["sub"] and claims["jti"]
    assert ADMIN_PASSWORD not in response.text
    tenants = client.get("/v1/admin/tenants", headers=bearer(body["access_token"]))
    assert tenants.status_code == 200


def test_wrong_password_is_401_and_audited(client: TestClient) -> None:
    guess = "a wrong password guess"
    wrong = sign_in(client, ADMIN_USERNAME, guess)
    assert_refused_token(wrong)
    unknown = sign_in(client, "nobody-at-all", guess)
    assert_refused_token(unknown)
    assert {**wrong.json(), "request_id": ""} == {**unknown.json(), "request_id": ""}

    events = audit_events(client, admin_token(client))
    failed = [e for e in events if e["action"] == "signin.failed"]
    assert {e["actor"] for e in failed} == {ADMIN_USERNAME, "nobody-at-all"}
    assert wrong.headers["X-Request-ID"] in {e["request_id"] for e in failed}
    assert guess not in json.dumps(events)


def test_forged_stale_and_tampered_tokens_are_refused(client: TestClient) -> None:
    admin = admin_token(client)
    auditor_token = new_staff(client, admin, role="auditor")[1]
    admin_claims = jwt.get_unverified_claims(admin)
    auditor_claims = jwt.get_unverified_claims(auditor_token)
    promoted = {**auditor_claims, "role": "admin"}
    header, _, signature = auditor_token.split(".")
    now = int(time.time())
    secret = server_secret(client)

    def signed(claims: dict[str, Any], key: str = secret, algorithm: str = "HS256") -> str:
        return str(jwt.encode(claims, key, algorithm=algorithm))

    forgeries = {
        "alg none": f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(admin_claims)}.",
        "wrong secret": signed(admin_claims, OTHER_SECRET),
        "another algorithm": signed(admin_claims, algorithm="HS512"),
        "role edited, not re-signed": f"{header}.{b64url(promoted)}.{signature}",
        "role edited, re-signed with another secret": signed(promoted, OTHER_SECRET),
        "role edited, signed with the server's secret": signed(promoted),
        "expired": signed({**admin_claims, "iat": now - 1000, "exp": now - 10}),
        "no exp": signed({k: v for k, v in admin_claims.items() if k != "exp"}),
        "not a jwt": "not.a.jwt",
    }
    # The same recipe with nothing wrong is accepted: every refusal below is for its defect.
    control = signed({**admin_claims, "iat": now, "exp": now + 60})
    tenants_before = client.get("/v1/admin/tenants", headers=bearer(control))
    assert tenants_before.status_code == 200, tenants_before.text

    for name, token in forgeries.items():
        response = client.post(
            "/v1/admin/tenants", json={"name": f"by {name}"}, headers=bearer(token)
        )
        assert response.status_code == 401, f"{name}: {response.status_code} {response.text}"
        assert_refused_token(response)
    tenants_after = client.get("/v1/admin/tenants", headers=bearer(control))
    assert tenants_after.json() == tenants_before.json()


def admin_route_calls(tenant_id: str, key_id: str) -> dict[tuple[str, str], dict[str, Any] | None]:
    """A well-formed request (body or None) for every admin route, against real objects."""
    return {
        ("POST", "/v1/admin/tenants"): {"name": "made-by-an-auditor"},
        ("GET", "/v1/admin/tenants"): None,
        ("GET", f"/v1/admin/tenants/{tenant_id}"): None,
        ("PATCH", f"/v1/admin/tenants/{tenant_id}"): {"status": "suspended"},
        ("POST", f"/v1/admin/tenants/{tenant_id}/keys"): {"name": "auditor's key"},
        ("GET", f"/v1/admin/tenants/{tenant_id}/keys"): None,
        ("POST", f"/v1/admin/keys/{key_id}/revoke"): None,
        ("POST", f"/v1/admin/keys/{key_id}/rotate"): {"grace_seconds": 0},
        ("POST", "/v1/admin/users"): {
            "username": "auditor-made-admin",
            "password": STAFF_PASSWORD,
            "role": "admin",
        },
        ("GET", "/v1/admin/models"): None,
        ("POST", "/v1/admin/models/v1-forest/activate"): None,
        ("POST", "/v1/admin/models/v1-forest/rollout"): {"percent": 50},
    }


def route_templates(client: TestClient, prefix: str) -> set[tuple[str, str]]:
    return {(method, path) for method, path in api_routes(client.app) if path.startswith(prefix)}


def test_auditors_are_refused_on_every_admin_route(client: TestClient) -> None:
    customer = new_customer(client)
    tenant_id, key_id = customer.tenant["id"], customer.key["id"]
    auditor, auditor_token = new_staff(client, customer.token, role="auditor")
    calls = admin_route_calls(tenant_id, key_id)
    # Every admin route of the app is in the table, so a new one cannot slip past this test.
    filled = {
        (method, path.format(tenant_id=tenant_id, key_id=key_id, version="v1-forest"))
        for method, path in route_templates(client, "/v1/admin")
    }
    assert filled == set(calls)

    for (method, path), body in calls.items():
        response = client.request(method, path, json=body, headers=bearer(auditor_token))
        assert response.status_code == 403, f"{method} {path}: {response.text}"
        assert response.json()["code"] == "forbidden"

    # Nothing changed: the key works, the tenant is active, the auditor left no trace.
    assert client.post("/v1/predict", json=FEATURES, headers=customer.headers).status_code == 200
    tenant = client.get(f"/v1/admin/tenants/{tenant_id}", headers=bearer(customer.token))
    assert tenant.json()["status"] == "active"
    assert len(client.get("/v1/admin/tenants", headers=bearer(customer.token)).json()) == 1
    assert not [
        e for e in audit_events(client, customer.token) if e["actor"] == auditor["username"]
    ]


def test_auditors_read_the_audit_routes(client: TestClient) -> None:
    customer = new_customer(client)
    auditor_token = new_staff(client, customer.token, role="auditor")[1]
    for path in route_templates(client, "/v1/audit"):
        response = client.get(path[1], headers=bearer(auditor_token))
        assert response.status_code == 200, f"{path}: {response.text}"
    actions = {e["action"] for e in audit_events(client, auditor_token)}
    assert {"tenant.create", "key.issue", "user.create"} <= actions


def test_staff_passwords_need_12_characters_and_are_never_echoed(client: TestClient) -> None:
    token = admin_token(client)

    def create(username: str, password: str) -> httpx.Response:
        user = {"username": username, "password": password, "role": "auditor"}
        return client.post("/v1/admin/users", json=user, headers=bearer(token))

    too_short = create("shorty", "elevenchars")
    assert too_short.status_code == 422, too_short.text
    assert too_short.json()["code"] == "validation_error"
    assert ["body", "password"] in [e["loc"] for e in too_short.json()["errors"]]
    assert "elevenchars" not in too_short.text

    created = create("twelve", "twelve-chars")
    assert created.status_code == 201, created.text
    assert set(created.json()) == {"id", "username", "role", "tenant_id", "created_at"}
    assert "twelve-chars" not in created.text
    signed_in = sign_in(client, "twelve", "twelve-chars")
    assert signed_in.status_code == 200
    assert "twelve-chars" not in signed_in.text
    assert "twelve-chars" not in json.dumps(audit_events(client, token))
    assert "shorty" not in json.dumps(audit_events(client, token)), "the refused user exists"


def test_bootstrap_admin_is_created_once(
    make_settings: Callable[..., Settings], database_url: str
) -> None:
    def start_and_sign_in(_: int) -> str:
        with TestClient(create_app(make_settings())) as started:
            return admin_token(started)

    # Two workers starting together on an empty database, then a restart.
    with ThreadPoolExecutor(max_workers=2) as pool:
        first_tokens = list(pool.map(start_and_sign_in, range(2)))
    with TestClient(create_app(make_settings())) as restarted:
        subjects = {
            jwt.get_unverified_claims(t)["sub"] for t in [*first_tokens, admin_token(restarted)]
        }
        assert len(subjects) == 1, "each start made its own admin"
        still_valid = restarted.get("/v1/admin/tenants", headers=bearer(first_tokens[0]))
        assert still_valid.status_code == 200
    admins = stored_rows(
        database_url, "SELECT id FROM users WHERE username = :name", name=ADMIN_USERNAME
    )
    assert len(admins) == 1


def test_repeated_sign_ins_are_locked_out_and_audited(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings(signin_rate_limit="3/minute"))) as client:
        token = admin_token(client)  # the first of three attempts a minute
        statuses = [sign_in(client, ADMIN_USERNAME, "guess number 1").status_code for _ in range(2)]
        assert statuses == [401, 401]
        locked = sign_in(client, ADMIN_USERNAME, "guess number 3")
        assert locked.status_code == 429, locked.text
        assert locked.json()["code"] == "rate_limited"
        assert 1 <= int(locked.headers["Retry-After"]) <= 60
        # Locked out means locked out: the right password waits too.
        assert sign_in(client, ADMIN_USERNAME, ADMIN_PASSWORD).status_code == 429

        events = audit_events(client, token)
        lockouts = [e for e in events if e["action"] == "signin.locked_out"]
        assert lockouts and {e["actor"] for e in lockouts} == {ADMIN_USERNAME}
        assert locked.headers["X-Request-ID"] in {e["request_id"] for e in lockouts}
        assert create_tenant(client, token)["status"] == "active", "a held token still works"
