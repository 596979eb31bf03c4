"""The logs as an operator reads them: one JSON object a line, one line a request, no secrets.

The scenario tests run `tenantserve serve` as a subprocess and read what it wrote to stdout and
stderr; the unit tests call the redaction and anonymisation processors directly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from auth.keys import generate
from service.config import DEV_API_KEY_PEPPER, Settings
from service.logging import MASK, Redactor, anonymise_ip, stdlib_formatter
from tests.conftest import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    FEATURES,
    ROOT,
    LiveServer,
    admin_token,
    free_port,
    live_server,
    new_customer,
)
from tests.failing_server import BOOM_PATH, LEAKED_KEY

FAILING_SERVER = ("-m", "tests.failing_server")
pytestmark = pytest.mark.slow

# Distinctive, so that finding them anywhere in the output can only mean a leak.
JWT_SECRET = "jwt-secret-only-in-the-logging-test-7f3a9c"
PEPPER = "pepper-only-in-the-logging-test-b81e44d0"
WRONG_PASSWORD = "wrong-password-only-in-the-logging-test"
CALLER_REQUEST_ID = "caller-trace.42_ABC"
CLIENT_ADDRESS, ANONYMISED_CLIENT = "127.0.0.1", "127.0.0.0"
SAMPLE = list(FEATURES.values())


def server_env(tmp_path: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'tenantserve.db'}",
        "TENANTSERVE_MODEL_DIR": str(model_dir),
        "TENANTSERVE_JWT_SECRET": JWT_SECRET,
        "TENANTSERVE_API_KEY_PEPPER": PEPPER,
        **extra,
    }


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of the output as a JSON object; fails on the first line that is not one."""
    lines = []
    for number, line in enumerate(output.splitlines(), start=1):
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"output line {number} is not JSON: {line!r}")
        assert isinstance(parsed, dict), f"output line {number} is not an object: {line!r}"
        lines.append(parsed)
    return lines


@dataclass
class Sent:
    """A request as the client saw it, and the fields its log line must carry."""

    response: httpx.Response
    expected: dict[str, Any]

    @property
    def request_id(self) -> str:
        return self.response.headers["X-Request-ID"]


@dataclass
class Run:
    """What a scenario sent, what it must not leak, and what the server wrote meanwhile."""

    server_url: str = ""
    output: str = ""
    sent: list[Sent] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)

    def record(self, response: httpx.Response) -> None:
        """An httpx response hook: every request, the set-up ones included, is remembered."""
        expected = {
            "method": response.request.method,
            "path": response.request.url.path,
            "status_code": response.status_code,
        }
        self.sent.append(Sent(response, expected))

    def expect(self, **fields: Any) -> None:
        """Fields the log line of the last request must also carry."""
        self.sent[-1].expected.update(fields)

    @property
    def last(self) -> httpx.Response:
        return self.sent[-1].response

    def lines(self) -> list[dict[str, Any]]:
        return json_lines(self.output)

    def logged(self, event: str) -> dict[str, list[dict[str, Any]]]:
        """The lines of one event, by request id."""
        found: dict[str, list[dict[str, Any]]] = {}
        for line in self.lines():
            if line["event"] == event:
                found.setdefault(line["request_id"], []).append(line)
        return found


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Run:
    """One server, the requests of a working day and its mishaps; the server stopped after."""
    tmp_path = tmp_path_factory.mktemp("scenario")
    run = Run()
    with live_server(
        server_env(tmp_path, model_dir), tmp_path / "server.log", command=FAILING_SERVER
    ) as server:
        with server.client(event_hooks={"response": [run.record]}) as client:
            token = admin_token(client)
            customer = new_customer(client, token)
            known = {"tenant_id": customer.tenant["id"], "key_id": customer.key["id"]}

            client.post("/v1/predict", json=FEATURES, headers=customer.headers)
            version = run.last.json()["model_version"]
            run.expect(**known, model_version=version, items=1)

            batch = {"items": [FEATURES] * 3}
            client.post("/v1/predict/batch", json=batch, headers=customer.headers)
            run.expect(**known, model_version=version, items=3)

            invalid = {**FEATURES, "petal_width": -1}
            client.post("/v1/predict", json=invalid, headers=customer.headers)
            run.expect(**known, model_version=None, items=0)

            # Right key id and checksum, wrong secret; the caller sends a trace id of its own.
            forged = generate(DEV_API_KEY_PEPPER, key_id=customer.key["id"]).token
            headers = {"X-API-Key": forged, "X-Request-ID": CALLER_REQUEST_ID}
            client.post("/v1/predict", json=FEATURES, headers=headers)

            # Not 1-128 characters of [A-Za-z0-9._-]: replaced by an id of the server's.
            client.get("/health", headers={"X-Request-ID": "no spaces allowed"})

            signin = {"username": ADMIN_USERNAME, "password": WRONG_PASSWORD}
            client.post("/v1/auth/token", data=signin)

            client.get(BOOM_PATH)

        server.stop()  # so that the shutdown lines are checked too
    run.server_url, run.output = server.url, server.output()
    run.secrets = {
        "API key": customer.key["key"],
        "forged API key": forged,
        "JWT": token,
        "admin password": ADMIN_PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "API key pepper": PEPPER,
        "JWT secret": JWT_SECRET,
        "key in an exception": LEAKED_KEY,
    }
    return run


def test_every_line_is_a_json_object_uvicorns_too(scenario: Run) -> None:
    lines = scenario.lines()  # fails on the first line that is not JSON
    assert all({"event", "level", "timestamp"} <= set(line) for line in lines)
    uvicorn = [line["event"] for line in lines if line.get("logger") == "uvicorn.error"]
    assert "Application startup complete." in uvicorn
    assert uvicorn[-1].startswith("Finished server process")
    # No access log: uvicorn's would say `"GET /path HTTP/1.1" 200` again for each request.
    assert not [line for line in lines if line.get("logger") == "uvicorn.access"]
    assert not [line for line in lines if 'HTTP/1.1"' in line["event"]]


def test_a_first_serve_prints_only_json_on_stdout(tmp_path: Path) -> None:
    """The real `tenantserve serve` in an empty folder: no settings, so its defaults put the
    database, the models (trained now) and the journal there, and it prints the first-key hint."""
    with live_server({}, tmp_path / "stdout.log", stderr_path=tmp_path / "stderr.log") as server:
        with server.client() as client:
            customer = new_customer(client)
            answer = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
            assert answer.status_code == 200, answer.text
        # uvicorn re-raises SIGTERM once shut down gracefully ("stopped" below says it was).
        assert server.stop() in (0, -signal.SIGTERM)
    lines = json_lines(server.output())  # fails on the first line that is not JSON
    events = [line["event"] for line in lines]
    for expected in ("models_trained", "get_a_first_key", "started", "request", "stopped"):
        assert expected in events, f"no {expected!r} line on stdout: {events}"
    hint = lines[events.index("get_a_first_key")]
    assert any("keys issue" in command for command in hint["commands"])
    assert (tmp_path / "models").is_dir() and (tmp_path / "tenantserve.db").is_file()


def test_one_request_line_per_request_with_its_ids(scenario: Run) -> None:
    logged = scenario.logged("request")
    statuses = [sent.response.status_code for sent in scenario.sent]
    assert statuses == [200, 201, 201, 200, 200, 422, 401, 200, 401, 500]
    for sent in scenario.sent:
        mine = logged.pop(sent.request_id, [])
        assert len(mine) == 1, f"{len(mine)} request lines for {sent.expected}"
        line = mine[0]
        assert line["client"] == ANONYMISED_CLIENT
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] > 0
        assert "features" not in line  # TENANTSERVE_LOG_FEATURES is off
        assert {name: line.get(name) for name in sent.expected} == sent.expected
        if "key_id" not in sent.expected:  # not known: not there
            assert not {"tenant_id", "key_id", "model_version", "items"} & set(line)
    # The harness's readiness polls are the only other requests.
    assert {(line["method"], line["path"]) for [line] in logged.values()} == {("GET", "/health")}


def test_a_callers_request_id_round_trips(scenario: Run) -> None:
    def sent_with(request_id: str) -> httpx.Response:
        return next(
            sent.response
            for sent in scenario.sent
            if sent.response.request.headers.get("X-Request-ID") == request_id
        )

    refused = sent_with(CALLER_REQUEST_ID)
    assert refused.headers["X-Request-ID"] == CALLER_REQUEST_ID
    assert refused.json()["request_id"] == CALLER_REQUEST_ID
    [line] = scenario.logged("request")[CALLER_REQUEST_ID]
    assert line["path"] == "/v1/predict"
    assert line["status_code"] == 401
    renamed = sent_with("no spaces allowed")
    assert renamed.headers["X-Request-ID"] not in ("", "no spaces allowed")
    assert len(scenario.logged("request")[renamed.headers["X-Request-ID"]]) == 1


def test_an_internal_error_is_a_bare_500_and_a_masked_traceback_in_the_log(
    scenario: Run,
) -> None:
    failed = scenario.sent[-1].response
    assert failed.status_code == 500
    assert failed.headers["content-type"] == "application/problem+json"
    problem = failed.json()
    assert problem["code"] == "internal_error"
    assert problem["request_id"] == failed.headers["X-Request-ID"]
    assert "unexpected failure" not in failed.text
    assert LEAKED_KEY not in failed.text

    # The request id is bound for the whole request: the error line has it too.
    [error] = scenario.logged("unhandled_error")[failed.headers["X-Request-ID"]]
    assert error["level"] == "error"
    [raised] = error["exception"]
    assert raised["exc_type"] == "RuntimeError"
    assert raised["exc_value"] == f"unexpected failure while handling key {MASK}"
    assert raised["frames"][-1]["name"] == "boom"
    assert all("locals" not in frame for frame in raised["frames"])


def test_no_secret_and_no_full_client_address_anywhere(scenario: Run) -> None:
    for what, secret in scenario.secrets.items():
        assert secret not in scenario.output, f"the {what} is in the log"
    # The one place the loopback address stays: uvicorn's line naming the server's own URL.
    assert CLIENT_ADDRESS not in scenario.output.replace(scenario.server_url, "<server url>")


def test_feature_values_are_logged_only_when_enabled(tmp_path: Path, model_dir: Path) -> None:
    env = server_env(tmp_path, model_dir, TENANTSERVE_LOG_FEATURES="true")
    with live_server(env, tmp_path / "server.log") as server, server.client() as client:
        customer = new_customer(client)
        single = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
        batch = {"items": [FEATURES, FEATURES]}
        batched = client.post("/v1/predict/batch", json=batch, headers=customer.headers)
    lines = json_lines(server.output())
    by_id = {line.get("request_id"): line for line in lines if line["event"] == "request"}
    assert by_id[single.headers["X-Request-ID"]]["features"] == [SAMPLE]
    assert by_id[batched.headers["X-Request-ID"]]["features"] == [SAMPLE, SAMPLE]


@contextmanager
def console_server(tmp_path: Path, model_dir: Path) -> Iterator[LiveServer]:
    """`tenantserve serve` with console logs; `live_server` waits for a JSON "started" line."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSERVE_")}
    env.update(
        server_env(tmp_path, model_dir),
        PYTHONPATH=str(ROOT),
        TENANTSERVE_PORT=str(port),
        TENANTSERVE_LOG_FORMAT="console",
    )
    log_path = tmp_path / "console.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.failing_server"],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"console server did not start:\n{server.output()[-3000:]}")
        yield server
    finally:
        server.stop()


def test_console_format_is_for_people_and_survives_errors(tmp_path: Path, model_dir: Path) -> None:
    with console_server(tmp_path, model_dir) as server, server.client() as client:
        assert client.get(BOOM_PATH).status_code == 500
        assert client.get("/health").status_code == 200  # still serving after the traceback
        server.stop()
    output = server.output()
    assert "Application startup complete." in output
    assert f"path={BOOM_PATH}" in output
    assert "status_code=500" in output
    assert "RuntimeError: unexpected failure while handling key [REDACTED]" in output
    assert LEAKED_KEY not in output
    assert "Logging error" not in output  # what `logging` prints when a formatter crashes
    assert not any(line.startswith("{") for line in output.splitlines())


# Unit tests: the processors on their own


def test_sensitive_keys_are_masked_at_any_depth() -> None:
    event = {
        "event": "call",
        "Authorization": "Bearer abc",
        "request": {"headers": [{"X-API-Key": "k"}, {"accept": "json"}], "password": "p"},
        "user": {"email": "a@example.com", "name": "Ada"},
        "token": None,
    }
    assert Redactor()(None, "info", event) == {
        "event": "call",
        "Authorization": MASK,
        "request": {"headers": [{"X-API-Key": MASK}, {"accept": "json"}], "password": MASK},
        "user": {"email": MASK, "name": "Ada"},
        "token": None,
    }


def test_api_keys_and_jwts_are_masked_inside_any_string() -> None:
    key = generate(DEV_API_KEY_PEPPER).token
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEiLCJyb2xlIjoiYWRtaW4ifQ.c2lnbmF0dXJlLXBhcnQ"
    event = {
        "event": f"key {key} refused",
        "detail": {"reasons": [f"token={jwt};"]},
        "harmless": "tsk and eyJ alone are words",
    }
    assert Redactor()(None, "info", event) == {
        "event": f"key {MASK} refused",
        "detail": {"reasons": [f"token={MASK};"]},
        "harmless": "tsk and eyJ alone are words",
    }


def test_operators_add_keys_to_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTSERVE_LOG_REDACT_KEYS", " SSN ,customer_ref,")
    redactor = Redactor.from_settings(Settings(_env_file=None))
    event = {"event": "e", "ssn": "078-05-1120", "nested": {"Customer_Ref": "c-1"}, "id": "x"}
    assert redactor(None, "info", event) == {
        "event": "e",
        "ssn": MASK,
        "nested": {"Customer_Ref": MASK},
        "id": "x",
    }


@pytest.mark.parametrize(
    ("address", "anonymised"),
    [
        ("203.0.113.77", "203.0.113.0"),
        ("127.0.0.1", "127.0.0.0"),
        ("2001:db8:85a3:8d3:1319:8a2e:370:7348", "2001:db8:85a3::"),
        ("::1", "::"),
        ("not an address", None),
        (None, None),
    ],
)
def test_client_addresses_are_cut_to_a_network(address: str | None, anonymised: str | None) -> None:
    assert anonymise_ip(address) == anonymised


@pytest.mark.parametrize(
    ("message", "logged"),
    [
        ('203.0.113.77:5123 - "WebSocket /x" 403', '203.0.113.0:5123 - "WebSocket /x" 403'),
        ("[2001:db8:85a3:8d3::1]:443 - WebSocket", "[2001:db8:85a3::]:443 - WebSocket"),
        ("::1:53122 - WebSocket", "[::]:53122 - WebSocket"),
        ("Uvicorn running on http://10.1.2.3:8000", "Uvicorn running on http://10.1.2.3:8000"),
        ("at 12:34:56, version 1.2.3", "at 12:34:56, version 1.2.3"),
    ],
)  # fmt: skip
def test_library_lines_carry_no_client_address(message: str, logged: str) -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, message, (), None)
    formatter = stdlib_formatter(Settings(_env_file=None, log_format="json"))
    line = json.loads(formatter.format(record))
    assert line["event"] == logged
    assert line["logger"] == "uvicorn.error"
