"""Errors, request ids, health and the API description, as a client of the API sees them."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.conftest import FEATURES, Customer, live_server, new_customer

LIMIT = 2048  # bytes; the smallest TENANTSERVE_MAX_BODY_BYTES allowed is 1024
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
Client = TestClient | httpx.Client


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail", "code", "request_id"} <= set(body)
    assert body["status"] == status
    assert body["code"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def body_of(size: int) -> bytes:
    """Valid features padded with JSON whitespace to exactly `size` bytes."""
    text = json.dumps(FEATURES).encode()
    return text + b" " * (size - len(text))


def chunks_of(body: bytes, size: int = 512) -> Iterator[bytes]:
    """A generator body: httpx sends it chunked, with no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def post_features(client: Client, body: bytes | Iterator[bytes], customer: Customer) -> Any:
    headers = {**customer.headers, "Content-Type": "application/json"}
    return client.post("/v1/predict", content=body, headers=headers)


def assert_body_limit(client: Client, customer: Customer) -> None:
    """Up to the limit is served; a byte more is 413, declared or chunked."""
    for make_body in (body_of, lambda size: chunks_of(body_of(size))):
        assert post_features(client, make_body(LIMIT), customer).status_code == 200
        too_large = post_features(client, make_body(LIMIT + 1), customer)
        assert_problem(too_large, 413, "payload_too_large")


def test_body_over_the_limit_is_413(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(max_body_bytes=LIMIT))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_body_limit(client, new_customer(client))
        # A declared oversize is refused before the key is even looked at.
        response = client.post(
            "/v1/predict/batch", content=b"x" * (LIMIT + 1), headers={"X-Request-ID": "big-1"}
        )
        assert assert_problem(response, 413, "payload_too_large")["request_id"] == "big-1"


@pytest.mark.slow
def test_a_real_server_refuses_oversized_bodies(model_dir: Path, tmp_path: Path) -> None:
    env = {
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'tenantserve.db'}",
        "TENANTSERVE_MODEL_DIR": str(model_dir),
        "TENANTSERVE_USAGE_JOURNAL_DIR": str(tmp_path / "journal"),
        "TENANTSERVE_MAX_BODY_BYTES": str(LIMIT),
    }
    with live_server(env, tmp_path / "server.log") as server, server.client() as client:
        assert_body_limit(client, new_customer(client))
        # 10 MB announced, not one byte sent: the answer must not wait for the body.
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: tenantserve\r\n"
                b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
            )
            reply = b"".join(iter(lambda: sock.recv(65536), b""))  # until the server closes
        head, _, payload = reply.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 413")
        assert "content-type: application/problem+json" in head.lower()
        assert json.loads(payload)["code"] == "payload_too_large"


def test_unknown_path_and_wrong_method_are_problems(client: TestClient) -> None:
    for method in ("GET", "POST", "DELETE"):
        body = assert_problem(client.request(method, "/v1/no-such-thing"), 404, "not_found")
        assert "Traceback" not in body["detail"]
    wrong_method = client.get("/v1/predict")
    assert_problem(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"
    assert_problem(client.delete("/health"), 405, "method_not_allowed")


def test_request_ids(client: TestClient) -> None:
    """The caller's id when well-formed, in the header and the error body; else a new one."""
    for kept in ("abc", "trace-1.2_3", "A" * 128):
        assert client.get("/health", headers={"X-Request-ID": kept}).headers["x-request-id"] == kept
        missing = client.get("/v1/missing", headers={"X-Request-ID": kept})
        assert assert_problem(missing, 404, "not_found")["request_id"] == kept
    given_ids = set()
    for sent in ("has spaces", "x" * 129, "y" * 200, "a/b", "semi;colon", ""):
        response = client.get("/v1/missing", headers={"X-Request-ID": sent})
        given = response.headers["x-request-id"]
        assert given != sent
        assert REQUEST_ID.match(given)
        assert assert_problem(response, 404, "not_found")["request_id"] == given
        given_ids.add(given)
    unasked = client.get("/health").headers["x-request-id"]
    assert REQUEST_ID.match(unasked)
    assert len(given_ids | {unasked}) == 7, "every request gets its own id"


def test_health_and_readiness(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert "x-request-id" in health.headers
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready"
    assert {"model", "database", "rate_limit_storage"} <= set(body["checks"])
    assert body["checks"]["database"] == "ok"
    assert "x-request-id" in ready.headers


def test_openapi_and_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"].values()
    assert {"type": "apiKey", "in": "header", "name": "X-API-Key"}.items() <= next(
        s for s in schemes if s["type"] == "apiKey"
    ).items()
    oauth2 = next(s for s in schemes if s["type"] == "oauth2")
    assert oauth2["flows"]["password"]["tokenUrl"] == "/v1/auth/token"

    problem = {"$ref": "#/components/schemas/Problem"}
    operations = [(path, op) for path, ops in spec["paths"].items() for op in ops.values()]
    assert {"/v1/predict", "/v1/predict/batch", "/health", "/ready"} <= {p for p, _ in operations}
    for path, operation in operations:
        responses = operation["responses"]
        success = [r for status, r in responses.items() if status.startswith("2")]
        assert success and all(r.get("content") for r in success), path
        errors = {s: r for s, r in responses.items() if s[0] in "45"}
        assert errors, f"{path} declares no error response"
        for status, response in errors.items():
            if path.endswith("/ready") and status == "503":
                continue  # not ready is a readiness report (here or in OIP's), not a problem
            assert response["content"] == {"application/problem+json": {"schema": problem}}, (
                path,
                status,
            )
    predict = spec["paths"]["/v1/predict"]["post"]
    assert {"401", "403", "413", "422", "429"} <= set(predict["responses"])
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Prediction"
    }
    assert "requestBody" in predict
    assert predict["security"], "predict must declare the API key"

    for docs in ("/docs", "/redoc"):
        page = client.get(docs)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in page.text
