"""What a client reads off the wire from the real server, whose protocol sends a response's head
and body in one write (`service/http_protocol.py`): every kind of response still arrives whole,
in order, and nothing a client waits for is held back.

Raw sockets, not an HTTP client: pipelining and `Expect: 100-continue` are what clients rarely
do, and what holding a head back could break.
"""

from __future__ import annotations

import csv
import io
import json
import socket

from tests.conftest import FEATURES, LiveServer, bearer, new_customer, wait_for


class _Wire:
    """One keep-alive connection, read response by response."""

    def __init__(self, server: LiveServer) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        self._socket = socket.create_connection((host, int(port)), timeout=10)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self._socket.sendall(data)

    def _until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            chunk = self._socket.recv(65536)
            assert chunk, f"connection closed; read so far: {self._buffer!r}"
            self._buffer += chunk
        found, self._buffer = self._buffer.split(marker, 1)
        return found

    def head(self) -> tuple[int, dict[str, str]]:
        status_line, *lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        return int(status_line.split(" ")[1]), {k.lower(): v for k, v in headers.items()}

    def body(self, length: int) -> bytes:
        while len(self._buffer) < length:
            chunk = self._socket.recv(65536)
            assert chunk, "connection closed mid-body"
            self._buffer += chunk
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return body

    def response(self) -> tuple[int, bytes]:
        status, headers = self.head()
        return status, self.body(int(headers["content-length"]))

    def close(self) -> None:
        self._socket.close()


def _request(
    method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: tenantserve"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_pipelined_requests_are_answered_whole_and_in_order(two_workers: LiveServer) -> None:
    with two_workers.client() as client:
        customer = new_customer(client)
    body = json.dumps(FEATURES).encode()
    predict = _request("POST", "/v1/predict", headers=customer.headers, body=body)
    wire = _Wire(two_workers)
    try:
        wire.send(_request("GET", "/health") + predict + _request("GET", "/no-such-path"))
        status, health = wire.response()
        assert (status, json.loads(health)["status"]) == (200, "ok")
        status, answer = wire.response()
        assert status == 200 and json.loads(answer)["species"] == "setosa"
        assert wire.response()[0] == 404
    finally:
        wire.close()


def test_a_head_request_gets_its_head_and_the_connection_goes_on(two_workers: LiveServer) -> None:
    wire = _Wire(two_workers)
    try:
        for path, answered in (("/health", 200), ("/ready", 200), ("/v1/usage", 405)):
            wire.send(_request("HEAD", path))
            # The head alone, whatever its content-length says: a body after it would be read
            # as the next answer's start.
            status, headers = wire.head()
            assert status == answered and int(headers["content-length"]) > 0
        wire.send(_request("GET", "/health"))
        assert wire.response() == (200, b'{"status":"ok"}')
    finally:
        wire.close()


def test_expect_100_continue_is_answered_before_the_body_is_sent(two_workers: LiveServer) -> None:
    with two_workers.client() as client:
        customer = new_customer(client)
    body = json.dumps(FEATURES).encode()
    headers = {**customer.headers, "Expect": "100-continue", "Content-Length": str(len(body))}
    wire = _Wire(two_workers)
    try:
        wire.send(_request("POST", "/v1/predict", headers=headers))
        assert wire.head() == (100, {})  # sent before the body: a held one would never come
        wire.send(body)
        status, answer = wire.response()
        assert status == 200 and json.loads(answer)["species"] == "setosa"
    finally:
        wire.close()


def test_a_streamed_csv_export_arrives_whole(two_workers: LiveServer) -> None:
    with two_workers.client() as client:
        customer = new_customer(client)
        for _ in range(3):
            assert (
                client.post("/v1/predict", json=FEATURES, headers=customer.headers).status_code
                == 200
            )
        params = {"tenant_id": customer.tenant["id"]}

        def exported() -> list[dict[str, str]]:
            export = client.get(
                "/v1/audit/usage/export", params=params, headers=bearer(customer.token)
            )
            assert export.status_code == 200
            assert export.headers["content-type"].startswith("text/csv")
            return list(csv.DictReader(io.StringIO(export.text)))

        # Written behind: the export shows the records once they are in the database.
        wait_for(lambda: len(exported()) == 3, within=10)
        assert [row["status_code"] for row in exported()] == ["200", "200", "200"]
