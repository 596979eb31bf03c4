"""The operator's command line, run as an operator runs it: a real process on the app's database.

What it creates is then used over HTTP against the running app. SQLite is enough: the commands
share the repository layer that the API tests run on both databases.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jose import jwt

from service.cli import NEW_USER_PASSWORD_ENV, _parser
from tests.conftest import FEATURES, admin_token, audit_events, wait_for

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

Run = Callable[..., subprocess.CompletedProcess[str]]
NEW_PASSWORD = "an operator-chosen password"


@pytest.fixture
def tenantserve(database_url: str, model_dir: Path, tmp_path: Path) -> Run:
    """`tenantserve <args>` in a fresh process, pointed at the test database and models."""

    def run(*args: str, env: dict[str, str] | None = None, ok: bool = True) -> Any:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSERVE_")}
        full_env.update(
            TENANTSERVE_ENV="development",
            TENANTSERVE_DATABASE_URL=database_url,
            TENANTSERVE_MODEL_DIR=str(model_dir),
            **(env or {}),
        )
        result = subprocess.run(
            [sys.executable, "-m", "service", *args],
            cwd=tmp_path,  # no stray .env
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    return run


def output(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


def predict(client: TestClient, key: str) -> int:
    return client.post("/v1/predict", json=FEATURES, headers={"X-API-Key": key}).status_code


def test_tenant_and_key_made_on_the_command_line_work_over_http(
    client: TestClient, tenantserve: Run
) -> None:
    tenant = output(tenantserve("tenants", "create", "--name", "acme", "--rate-limit", "50/minute"))
    assert tenant["name"] == "acme" and tenant["rate_limit"] == "50/minute"

    issued = tenantserve("keys", "issue", "--tenant", "acme", "--name", "first key")
    key = output(issued)
    assert key["key"].startswith("tsk_") and key["tenant_id"] == tenant["id"]
    assert "not shown again" in issued.stderr
    response = client.post("/v1/predict", json=FEATURES, headers={"X-API-Key": key["key"]})
    assert response.status_code == 200, response.text
    assert response.headers["X-RateLimit-Limit"] == "50"

    listed = tenantserve("keys", "list", "--tenant", tenant["id"])
    assert [k["id"] for k in output(listed)] == [key["id"]]
    revoked = tenantserve("keys", "revoke", key["id"])
    assert output(revoked)["status"] == "revoked"
    for result in (listed, revoked):
        assert key["key"] not in result.stdout + result.stderr
    wait_for(lambda: predict(client, key["key"]) == 401, within=1.0)

    events = audit_events(client, admin_token(client))
    by_cli = {e["action"] for e in events if e["actor"].startswith("cli:")}
    assert {"tenant.create", "key.issue", "key.revoke"} <= by_cli
    assert key["key"] not in json.dumps(events)


def test_staff_user_password_comes_from_the_environment(
    client: TestClient, tenantserve: Run
) -> None:
    tenant = output(tenantserve("tenants", "create", "--name", "globex"))
    created = tenantserve(
        "users", "create", "--username", "ops", "--role", "auditor", "--tenant", "globex",
        env={NEW_USER_PASSWORD_ENV: NEW_PASSWORD},
    )  # fmt: skip
    user = output(created)
    assert user["username"] == "ops" and user["tenant_id"] == tenant["id"]
    assert "password" not in json.dumps(user) and NEW_PASSWORD not in created.stdout
    claims = jwt.get_unverified_claims(admin_token(client, "ops", NEW_PASSWORD))
    assert claims["role"] == "auditor" and claims["tenant_id"] == tenant["id"]

    too_short = tenantserve(
        "users", "create", "--username", "brief", "--role", "admin",
        env={NEW_USER_PASSWORD_ENV: "short"}, ok=False,
    )  # fmt: skip
    assert too_short.returncode != 0
    assert "12 characters" in too_short.stderr and "short" not in too_short.stdout
    refused = client.post("/v1/auth/token", data={"username": "brief", "password": "short"})
    assert refused.status_code == 401
    events = audit_events(client, admin_token(client))
    made_by_cli = [e["target"] for e in events if e["action"] == "user.create"]
    assert made_by_cli == [user["id"]]
    assert NEW_PASSWORD not in json.dumps(events)


def commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (sub)command with its parser, walked from the real argument parser."""
    yield path or "tenantserve", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}".strip())


def test_no_command_takes_a_secret_on_its_command_line(tenantserve: Run) -> None:
    walked = dict(commands(_parser()))
    assert {"users create", "keys issue", "tenants create"} <= set(walked)
    for name, parser in walked.items():
        for action in parser._actions:
            names = [*action.option_strings, action.dest]
            assert not any("password" in n or "secret" in n for n in names), (name, names)

    refused = tenantserve(
        "users", "create", "--username", "x-user", "--role", "admin", "--password", NEW_PASSWORD,
        ok=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "unrecognized arguments: --password" in refused.stderr


def test_serve_refuses_a_port_another_server_listens_on(tenantserve: Run) -> None:
    # Listening as a server of several workers does, with SO_REUSEPORT: a second server with
    # workers of its own must still refuse the port, not quietly share its traffic.
    with socket.socket() as other_server:
        other_server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        for workers in ("1", "2"):
            env = {"TENANTSERVE_WORKERS": workers, "TENANTSERVE_PORT": str(port)}
            result = tenantserve("serve", env=env, ok=False)
            said = result.stdout + result.stderr  # one worker: uvicorn's log line; more: ours
            assert result.returncode != 0
            assert "address already in use" in said.lower()
            assert "Traceback" not in said
