"""The one middleware every request passes, written as plain ASGI (no BaseHTTPMiddleware).

In order: a request id (the caller's if well-formed), a body-size guard that also counts
chunked bodies, the response headers of the contract, a last-resort 500 in problem+json,
then — once the response is sent — the usage record, the metrics and the one log line.
"""

from __future__ import annotations

import re
import time
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api.context import RequestContext
from service.api.problems import PROBLEM_CONTENT_TYPE, problem_body
from service.config import Settings
from service.logging import anonymise_ip
from service.resources import Resources
from tenants.errors import PayloadTooLarge
from tenants.ids import fast_id

log = structlog.get_logger("tenantserve.request")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_UNRECORDED = frozenset({"/health", "/ready", "/metrics"})


class BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so FastAPI's body reader lets it through."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.max_body = settings.max_body_bytes
        self.log_features = settings.log_features

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._request_id(scope)
        # Every line logged while serving this request carries its id, whoever logs it.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        context = RequestContext(request_id=request_id)
        context.attach(scope)
        response: dict[str, Any] = {"status": 500, "started": False}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["started"] = True
                # Appended as raw pairs: no route sets these, and MutableHeaders would scan
                # and re-encode the whole list once per header.
                headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                window = context.rate_window
                if window is not None:
                    headers += [
                        (b"x-ratelimit-limit", b"%d" % window.limit),
                        (b"x-ratelimit-remaining", b"%d" % window.remaining),
                        (b"x-ratelimit-reset", b"%d" % window.retry_after),
                    ]
                message["headers"] = headers
            await send(message)

        try:
            if self._declared_length(scope) > self.max_body:
                await self._send_problem(send_with_headers, PayloadTooLarge(), request_id)
            else:
                await self.app(scope, self._limited(receive), send_with_headers)
        except ClientDisconnect:
            response["status"] = 499  # the client left before sending its body: nobody to answer
        except Exception:
            log.exception("unhandled_error")
            if not response["started"]:
                await self._send_problem(send_with_headers, None, request_id)
        finally:
            self._finish(scope, context, response["status"], started)

    @staticmethod
    def _request_id(scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate: str = value.decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    return candidate
                break
        return fast_id()

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    def _limited(self, receive: Receive) -> Receive:
        """Count the body as it arrives, so a chunked body cannot slip past the limit."""
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge()
            return message

        return receive_limited

    @staticmethod
    async def _send_problem(send: Send, error: PayloadTooLarge | None, request_id: str) -> None:
        status = error.status_code if error else 500
        body = problem_body(
            status=status,
            code=error.code if error else "internal_error",
            title=error.title if error else "Internal server error",
            detail=error.detail if error else "An unexpected error occurred; it has been logged.",
            request_id=request_id,
        )
        headers = [
            (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        if error:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _finish(self, scope: Scope, context: RequestContext, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        path: str = scope["path"]
        route = scope.get("route")
        route_path = getattr(route, "path", "unmatched")
        metrics.REQUESTS.labels(route_path, scope["method"], str(status)).inc()
        metrics.LATENCY.labels(route_path).observe(elapsed)
        fields: dict[str, Any] = {
            "request_id": context.request_id,
            "method": scope["method"],
            "path": path,
            "status_code": status,
            "duration_ms": round(elapsed * 1000, 3),
            "client": anonymise_ip(scope["client"][0] if scope.get("client") else None),
        }
        entry = (
            None
            if path in _UNRECORDED
            else context.usage_entry(
                method=scope["method"],
                path=path,
                status_code=status,
                latency_ms=fields["duration_ms"],
            )
        )
        if entry is not None:
            fields.update(
                tenant_id=entry.tenant_id,
                key_id=entry.key_id,
                model_version=entry.model_version,
                items=entry.items,
            )
            resources: Resources = scope["app"].state.resources
            resources.usage.add(entry)
        if self.log_features and context.features is not None:
            fields["features"] = context.features
        log.info("request", **fields)
