"""The one middleware every request passes, written as plain ASGI (no BaseHTTPMiddleware).

In order: a request id (the caller's if well-formed), the response headers of the contract,
a last-resort 500 in problem+json; when the response starts, the usage record — the start is
held until the record is durable (see `tenants.usage.recorder`) — and once it is sent, the
metrics and the one log line. It runs outermost (see `service.main.TenantServe`): the body
limit is FastAPI's own (`max_body_size`), whose plain-text 413 is turned into problem+json here.
"""

from __future__ import annotations

import re
import time
from typing import Any

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api.context import RequestContext
from service.api.problems import PROBLEM_CONTENT_TYPE, problem_body
from service.api.ratelimit_headers import ratelimit_fields
from service.config import Settings
from service.logging import REQUEST_ID, anonymise_ip, log_info
from service.resources import Resources
from tenants.errors import AppError, Overloaded, PayloadTooLarge
from tenants.ids import fast_id
from tenants.usage.records import UsageEntry

log = structlog.get_logger("tenantserve.request")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_UNRECORDED = frozenset({"/health", "/ready", "/metrics"})
_REPLACED_ON_413 = frozenset({b"content-type", b"content-length", b"connection"})


def _problem_headers(body: bytes, *, close: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", b"%d" % len(body)),
    ]
    return [*headers, (b"connection", b"close")] if close else headers


class JournalUnwritable(Exception):
    """The usage journal refused a write: the answer must not leave unrecorded."""

    detail = "Usage metering cannot write its journal; try again shortly."


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.log_features = settings.log_features

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._request_id(scope)
        REQUEST_ID.set(request_id)
        context = RequestContext(request_id=request_id)
        context.attach(scope)
        response: dict[str, Any] = {"status": 500, "started": False, "entry": None}
        problem_413: list[bytes] = []

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 413:
                    self._as_problem_413(message, problem_413, request_id)
                response["status"] = message["status"]
                response["started"] = True
                if response["entry"] is None:
                    await self._record(scope, context, response, started)
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
                    if context.customer is not None:
                        headers += ratelimit_fields(
                            context.customer, window, context.quota_remaining
                        )
                message["headers"] = headers
            elif problem_413:
                message = {"type": "http.response.body", "body": problem_413.pop()}
            if context.idempotency is not None:
                await context.idempotency.relay(message, send)
            else:
                await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:
            response["status"] = 499  # the client left before sending its body: nobody to answer
        except JournalUnwritable:
            response["started"] = False  # the route's answer was never sent
            await self._send_problem(send, Overloaded(JournalUnwritable.detail), request_id)
            response["status"] = Overloaded.status_code
            await self._record_unjournaled(scope, context, response, started)
        except Exception:
            log.exception("unhandled_error")
            if not response["started"]:
                await self._send_problem(send_with_headers, None, request_id)
        finally:
            if context.idempotency is not None:
                await context.idempotency.abandon()  # no-op once the answer was kept
            if response["entry"] is None:
                await self._record(scope, context, response, started, wait=False)
            self._finish(scope, context, response, started)

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
    def _as_problem_413(message: Message, body_out: list[bytes], request_id: str) -> None:
        """Starlette's body limit answers `Content Too Large` in plain text: say it our way (the
        problem's body goes out in place of the plain one, from `body_out`)."""
        headers = message.get("headers", ())
        if (b"content-type", PROBLEM_CONTENT_TYPE.encode()) in headers:
            return
        error = PayloadTooLarge()
        body = problem_body(status=413, code=error.code, title=error.title,
                            detail=error.detail, request_id=request_id)  # fmt: skip
        kept = [(k, v) for k, v in headers if k not in _REPLACED_ON_413]
        message["headers"] = [*kept, *_problem_headers(body, close=True)]
        body_out.append(body)

    @staticmethod
    def _entry(
        scope: Scope, context: RequestContext, response: dict[str, Any], started: float
    ) -> UsageEntry | None:
        """The request's usage record as its answer stands, if it is metered."""
        path: str = scope["path"]
        entry = (
            None
            if path in _UNRECORDED
            else context.usage_entry(
                method=scope["method"],
                path=path,
                status_code=response["status"],
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
            )
        )
        response["entry"] = entry or False
        return entry

    async def _record(
        self,
        scope: Scope,
        context: RequestContext,
        response: dict[str, Any],
        started: float,
        *,
        wait: bool = True,
    ) -> None:
        """The request's usage record (if metered), durable before the caller's answer. A quota
        reservation the request holds without a prediction served (an invalid body, a 403, a
        replay) goes back first: the answer's headers and the month count only what was."""
        await self._return_unserved_quota(context)
        entry = self._entry(scope, context, response, started)
        if entry is None:
            return
        resources: Resources = scope["app"].state.resources
        durable = resources.usage.add(entry)
        if durable is not None and wait:
            try:
                await durable
            except OSError:
                raise JournalUnwritable() from None

    async def _record_unjournaled(
        self, scope: Scope, context: RequestContext, response: dict[str, Any], started: float
    ) -> None:
        """The 503 that a journal failure made of the answer, metered all the same (one record
        for every authenticated request): queued for the database alone, since the journal
        refused it, so a crash before the next flush would lose it. The refused record was
        never queued, and the predictions it reserved go back to the quota."""
        context.items = 0  # whatever the model computed never reached the caller
        await self._return_unserved_quota(context)
        entry = self._entry(scope, context, response, started)
        if entry is not None:
            resources: Resources = scope["app"].state.resources
            resources.usage.add_unjournaled(entry)

    @staticmethod
    async def _return_unserved_quota(context: RequestContext) -> None:
        if context.quota is not None and not context.items:
            await context.quota.release()

    @staticmethod
    async def _send_problem(send: Send, error: AppError | None, request_id: str) -> None:
        status = error.status_code if error else 500
        body = problem_body(
            status=status,
            code=error.code if error else "internal_error",
            title=error.title if error else "Internal server error",
            detail=error.detail if error else "An unexpected error occurred; it has been logged.",
            request_id=request_id,
        )
        headers = _problem_headers(body, close=error is not None)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _finish(
        self, scope: Scope, context: RequestContext, response: dict[str, Any], started: float
    ) -> None:
        elapsed = time.perf_counter() - started
        status: int = response["status"]
        path: str = scope["path"]
        route = scope.get("route")
        route_path = getattr(route, "path", "unmatched")
        metrics.request_answered(route_path, scope["method"], status, elapsed)
        fields: dict[str, Any] = {
            "request_id": context.request_id,
            "method": scope["method"],
            "path": path,
            "status_code": status,
            "duration_ms": round(elapsed * 1000, 3),
            "client": anonymise_ip(scope["client"][0] if scope.get("client") else None),
        }
        entry: UsageEntry | bool = response["entry"]
        if isinstance(entry, UsageEntry):
            fields.update(
                tenant_id=entry.tenant_id,
                key_id=entry.key_id,
                model_version=entry.model_version,
                items=entry.items,
            )
            if entry.replay:
                fields["replay"] = True
        if self.log_features and context.features is not None:
            fields["features"] = context.features
        log_info(log, "request", fields)
