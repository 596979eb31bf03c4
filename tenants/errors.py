"""Errors that carry their own HTTP status and code; `service.api.problems` renders them.

They know nothing of any web framework (like MLServer's `errors.py`): the domain raises them,
the application turns them into problem+json. Every code the contract names is here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class AppError(Exception):
    status_code = 500
    code = "internal_error"
    title = "Internal server error"

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None):
        self.detail = detail or self.title
        self.headers = dict(headers or {})
        super().__init__(self.detail)


class MissingCredentials(AppError):
    status_code, code, title = 401, "missing_credentials", "Credentials required"


class InvalidCredentials(AppError):
    status_code, code, title = 401, "invalid_credentials", "Invalid credentials"


class Forbidden(AppError):
    status_code, code, title = 403, "forbidden", "Forbidden"


class TenantSuspended(AppError):
    status_code, code, title = 403, "tenant_suspended", "Tenant suspended"


class NotFound(AppError):
    status_code, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(AppError):
    status_code, code, title = 405, "method_not_allowed", "Method not allowed"


class Conflict(AppError):
    status_code, code, title = 409, "conflict", "Conflict"


class IdempotencyConflict(AppError):
    status_code, code, title = 409, "idempotency_conflict", "Idempotent request in flight"


class PayloadTooLarge(AppError):
    status_code, code, title = 413, "payload_too_large", "Payload too large"


class ValidationFailed(AppError):
    status_code, code, title = 422, "validation_error", "Validation error"

    def __init__(self, errors: Sequence[Mapping[str, Any]], detail: str | None = None):
        self.errors = [{"loc": list(e["loc"]), "msg": str(e["msg"])} for e in errors]
        super().__init__(detail or "The request is not valid; see `errors`.")


class IdempotencyMismatch(AppError):
    status_code, code, title = 422, "idempotency_mismatch", "Idempotency key reused"


class RateLimited(AppError):
    status_code, code, title = 429, "rate_limited", "Too many requests"


class QuotaExceeded(AppError):
    status_code, code, title = 429, "quota_exceeded", "Monthly quota exceeded"


class NotReady(AppError):
    status_code, code, title = 503, "not_ready", "Service not ready"


class Overloaded(AppError):
    status_code, code, title = 503, "overloaded", "Service overloaded"
