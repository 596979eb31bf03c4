"""No route but the public ones answers a caller without credentials.

The list of routes comes from the app itself, so a route added tomorrow without an auth
dependency fails here the day it is added.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.conftest import api_routes

PUBLIC = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/docs",
        "/redoc",
        "/openapi.json",
        "/docs/oauth2-redirect",
        "/v1/auth/token",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
    }
)
# Where the tests' failing route lives (tests/failing_server.py); never in the product.
TEST_ONLY_PREFIX = "/v1/_test/"


def with_dummy_parameters(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "dummy-value", path)


def protected_routes(client: TestClient) -> list[tuple[str, str]]:
    routes = sorted((method, path) for method, path in api_routes(client.app) if path not in PUBLIC)
    assert len(routes) >= 15, routes  # customer, admin and audit routes at least
    return routes


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_credentials"),
        (
            {"X-API-Key": "tsk_not-a-real-key", "Authorization": "Bearer not.a.jwt"},
            "invalid_credentials",
        ),
    ],
    ids=["anonymous", "made-up credentials"],
)
def test_every_non_public_route_refuses_callers_without_credentials(
    client: TestClient, headers: dict[str, str], code: str
) -> None:
    answered = []
    for method, path in protected_routes(client):
        response = client.request(method, with_dummy_parameters(path), json={}, headers=headers)
        if response.status_code != 401 or response.json()["code"] != code:
            answered.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
        elif not response.headers.get("WWW-Authenticate"):
            answered.append(f"{method} {path}: 401 without WWW-Authenticate")
    assert not answered, "\n".join(answered)


def test_public_routes_answer_without_credentials(client: TestClient) -> None:
    for path in PUBLIC - {"/v1/auth/token"}:
        response = client.get(path)
        assert response.status_code == 200, f"{path}: {response.status_code}"
    # The sign-in form itself is public: a missing form is a validation error, not a 401.
    assert client.post("/v1/auth/token").status_code == 422


def test_the_product_has_no_route_that_fails_on_purpose() -> None:
    secrets = {"jwt_secret": "j" * 40, "api_key_pepper": "p" * 40}
    for env in ("development", "production"):
        app = create_app(Settings(_env_file=None, env=env, **secrets))  # type: ignore[arg-type]
        leftovers = [path for _, path in api_routes(app) if path.startswith(TEST_ONLY_PREFIX)]
        assert not leftovers, f"{env}: {leftovers}"
