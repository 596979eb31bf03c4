"""`Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header, Stripe's semantics).

A request that carries the header claims (its caller, the key) in the shared store before it
runs. A retry with the same key and the same method, path and body gets the first answer again,
status and body, with `Idempotent-Replayed: true` — nothing runs again; another body is 422
`idempotency_mismatch`; a retry while the first is still running is 409 `idempotency_conflict`.

Stored per (caller, sha256 of the key), the answer encrypted (AES-GCM) under an HMAC of the
key with the pepper: an issued API key inside a stored answer is readable by no one who lacks
the Idempotency-Key, not even from the database or Redis.

Kept: every answer of a request that ran, 2xx and 4xx alike (a 404 or 409 is the answer to that
request). Not kept, so the same key can be sent again: 422 (validation refused the request),
429 (it was turned away before running) and 5xx (it may not have run).

The route (or `AdminIdempotent`, for dependency-solved routes) calls `begin`; the middleware
hands the answer to the claim's `relay`, which keeps it before it is sent, so a retry that
arrives after the answer always finds it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import Depends, FastAPI, Header, Request
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response
from starlette.types import Message, Send

from service.api.context import context_of
from service.api.dependencies import AdminCaller, ResourcesDep
from service.idempotency_store import IdempotencyStore, StoredAnswer
from service.resources import Resources
from tenants.errors import IdempotencyConflict, IdempotencyMismatch, NotReady, ValidationFailed

log = structlog.get_logger("tenantserve.idempotency")
HEADER = "Idempotency-Key"
_DESCRIPTION = (
    "1-255 printable characters, unique per intended operation: a retry with the same key "
    "and body within the retention time gets the first answer again."
)
PARAMETER: dict[str, Any] = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": _DESCRIPTION,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}
_REPLAYED_DOC = {
    "Idempotent-Replayed": {
        "description": "`true` on an answer repeated for a retried `Idempotency-Key`.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


def openapi_extra(success_status: int) -> dict[str, Any]:
    """The `Idempotent-Replayed` response header, for a route's `openapi_extra`."""
    return {"responses": {str(success_status): {"headers": _REPLAYED_DOC}}}


class IdempotentReplay(Exception):
    """Raised instead of running the request again; answered with the stored answer."""

    def __init__(self, status_code: int, content_type: str | None, body: bytes) -> None:
        super().__init__("idempotent replay")
        self.status_code, self.content_type, self.body = status_code, content_type, body


def _kept(status: int) -> bool:
    return 200 <= status < 500 and status not in (422, 429)


@dataclass(eq=False)
class IdempotencyClaim:
    """This request's claim on its key: holds the answer until it is whole and kept."""

    store: IdempotencyStore
    scope: str
    key: str
    """sha256 of the caller's key: the key itself is stored nowhere."""
    fingerprint: str
    cipher: AESGCM
    _start: Message | None = None
    _body: list[bytes] = field(default_factory=list)
    _settled: bool = False

    async def relay(self, message: Message, send: Send) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            return
        if message["type"] != "http.response.body" or self._start is None:
            await send(message)
            return
        self._body.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self._body)
        status = int(self._start["status"])
        content_type = next(
            (v.decode("latin-1") for k, v in self._start["headers"] if k == b"content-type"),
            None,
        )
        answer = StoredAnswer(self.fingerprint, status, content_type, _seal(self.cipher, body))
        await self._settle(answer if _kept(status) else None)
        await send(self._start)
        await send({"type": "http.response.body", "body": body})

    async def abandon(self) -> None:
        """The request ended without a whole answer: let the key be used again."""
        await self._settle(None)

    async def _settle(self, answer: StoredAnswer | None) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            if answer is None:
                await self.store.release(self.scope, self.key)
            else:
                await self.store.save(self.scope, self.key, answer)
        except (RedisError, SQLAlchemyError, OSError) as exc:
            # The answer still goes out; a retry then finds the claim until it expires (409).
            log.warning("idempotency_store_failed", error=type(exc).__name__)


def _seal(cipher: AESGCM, body: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + cipher.encrypt(nonce, body, None)


def _open(cipher: AESGCM, sealed: bytes) -> bytes:
    return cipher.decrypt(sealed[:12], sealed[12:], None)


def _valid_key(value: str) -> bool:
    return 1 <= len(value) <= 255 and value.isascii() and value.isprintable()


async def begin(request: Request, resources: Resources, scope: str, body: bytes) -> None:
    """Claim the request's `Idempotency-Key`, if it has one; raise if it is not to run."""
    key = request.headers.get(HEADER)
    if key is None:
        return
    if not _valid_key(key):
        raise ValidationFailed([{"loc": ["header", HEADER], "msg": _DESCRIPTION}])
    digest = hashlib.sha256(f"{request.method}\n{request.url.path}\n".encode())
    digest.update(body)
    fingerprint = digest.hexdigest()
    named = f"{scope}\0{key}".encode()
    stored_key = hashlib.sha256(named).hexdigest()
    pepper = resources.settings.api_key_pepper.get_secret_value().encode()
    cipher = AESGCM(hmac.digest(pepper, named, "sha256"))
    try:
        held = await resources.idempotency.claim(scope, stored_key, fingerprint)
    except (RedisError, SQLAlchemyError, OSError):
        raise NotReady("Idempotency keys cannot be checked right now; try again shortly.") from None
    context = context_of(request)
    if held is None:
        context.idempotency = IdempotencyClaim(
            resources.idempotency, scope, stored_key, fingerprint, cipher
        )
        return
    if held.fingerprint != fingerprint:
        raise IdempotencyMismatch(
            "This Idempotency-Key was used with another request; use a new key."
        )
    if held.status_code is None:
        raise IdempotencyConflict("The first request with this Idempotency-Key is still running.")
    try:
        answer = _open(cipher, held.body)
    except InvalidTag:  # kept under another pepper: unreadable now
        raise IdempotencyMismatch(
            "This Idempotency-Key cannot be replayed; use a new key."
        ) from None
    context.replay = True
    raise IdempotentReplay(held.status_code, held.content_type, answer)


async def _admin_idempotency(
    request: Request,
    staff: AdminCaller,
    resources: ResourcesDep,
    idempotency_key: Annotated[str | None, Header(alias=HEADER, description=_DESCRIPTION)] = None,
) -> None:
    if idempotency_key is not None:
        await begin(request, resources, f"user:{staff.user_id}", await request.body())


AdminIdempotent = Depends(_admin_idempotency)
"""For an admin route's `dependencies=`: the header, scoped to the staff user."""


async def _replay(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, IdempotentReplay)
    return Response(
        exc.body,
        status_code=exc.status_code,
        media_type=exc.content_type,
        headers={"Idempotent-Replayed": "true"},
    )


def install_replay_handler(app: FastAPI) -> None:
    app.add_exception_handler(IdempotentReplay, _replay)
