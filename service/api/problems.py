"""The one problem+json renderer (RFC 9457), the handlers that use it, and its OpenAPI entries.

Every error the API returns — ours (`tenants.errors`), FastAPI's 404/405/422, an oversized body,
an unexpected exception — leaves through `problem_response`, so clients parse one shape.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.api.context import context_of
from tenants.errors import (
    AppError,
    Conflict,
    Forbidden,
    InvalidCredentials,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ValidationFailed,
)

PROBLEM_CONTENT_TYPE = "application/problem+json"
log = structlog.get_logger("tenantserve.errors")


_ERRORS_BY_STATUS: dict[int, type[AppError]] = {
    cls.status_code: cls
    for cls in (
        InvalidCredentials,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
    )
}


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    """The error body (RFC 9457 problem details)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str
    errors: list[FieldError] | None = None
    error: str | None = Field(
        default=None, description="On the Open Inference Protocol routes: what OIP clients show"
    )


def problem_body(
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    request_id: str,
    errors: list[dict[str, Any]] | None = None,
    oip_error: str | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "type": f"https://tenantserve.dev/problems/{code.replace('_', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id,
    }
    if errors is not None:
        body["errors"] = errors
    if oip_error is not None:
        body["error"] = oip_error
    return orjson.dumps(body)


def problem_response(error: AppError, request_id: str, *, oip: bool = False) -> Response:
    """The error's problem+json; with `oip`, also the `error` member OIP clients read."""
    errors = error.errors if isinstance(error, ValidationFailed) else None
    return Response(
        problem_body(
            status=error.status_code,
            code=error.code,
            title=error.title,
            detail=error.detail,
            request_id=request_id,
            errors=errors,
            oip_error=_oip_message(error) if oip else None,
        ),
        status_code=error.status_code,
        headers=error.headers,
        media_type=PROBLEM_CONTENT_TYPE,
    )


def _oip_message(error: AppError) -> str:
    """One line that says what is wrong: OIP clients show only this member."""
    if isinstance(error, ValidationFailed) and error.errors:
        return "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors[:3]
        )
    return error.detail


def _respond(request: Request, error: AppError) -> Response:
    # The Open Inference Protocol's routes answer in problem+json with its `error` member too.
    oip = request.url.path.startswith("/v2/")
    return problem_response(error, context_of(request).request_id, oip=oip)


async def _app_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return _respond(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return _respond(request, ValidationFailed(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI answers an unreadable body with 400; to clients it is invalid input.
        error: AppError = ValidationFailed([{"loc": ["body"], "msg": "malformed request body"}])
    elif exc.status_code in _ERRORS_BY_STATUS:
        error = _ERRORS_BY_STATUS[exc.status_code]()
    else:  # a status no route raises today (406, 415 …): kept, never turned into a 500
        error = AppError(str(exc.detail))
        error.status_code, error.title = exc.status_code, HTTPStatus(exc.status_code).phrase
        error.code = error.title.lower().replace(" ", "_").replace("-", "_")
    error.headers.update(exc.headers or {})
    return _respond(request, error)


async def _database_unreachable(request: Request, exc: Exception) -> Response:
    # A lost connection is an outage to report as 503, not a bug to report as 500.
    log.warning("database_unreachable", error=type(exc).__name__, path=request.url.path)
    return _respond(request, NotReady("The database is unreachable; try again shortly."))


async def _unstorable(request: Request, exc: Exception) -> Response:
    # The database refused a value the schemas let through (a NUL in a path segment or a
    # sign-in name, which PostgreSQL text cannot hold): the caller's input, so 422.
    log.info("database_refused_value", error=type(exc).__name__, path=request.url.path)
    return _respond(
        request, ValidationFailed([{"loc": [], "msg": "a value the database cannot hold"}])
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette's ServerErrorMiddleware sends this, then re-raises for the request middleware
    # to log: nothing of the exception reaches the client.
    return _respond(request, AppError())


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(AppError, _app_error)
    for outage in (OperationalError, InterfaceError, SQLAlchemyTimeoutError):
        app.add_exception_handler(outage, _database_unreachable)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    _document_problems(app)


def error_responses(*errors: type[AppError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the errors a route can return."""
    declared: dict[int | str, dict[str, Any]] = {}
    for cls in errors:
        entry = declared.setdefault(
            cls.status_code,
            {"model": Problem, "content": {PROBLEM_CONTENT_TYPE: {}}, "description": ""},
        )
        codes = [c for c in entry["description"].split(", ") if c]
        entry["description"] = ", ".join([*codes, f"`{cls.code}`"])
    return declared


_PROBLEM_REF = "#/components/schemas/Problem"
_FASTAPI_422_REF = "#/components/schemas/HTTPValidationError"


def _document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document say what the handlers send: problem+json, never FastAPI's shapes.

    NOTE: FastAPI files a `responses=` model under `application/json` and adds its own 422
    schema to every route with parameters; both describe bodies this server never sends.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "Problem" not in components:
            problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(problem_schema.pop("$defs", {}), Problem=problem_schema)
        problem = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": _PROBLEM_REF}}}
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                content = response.get("content", {}).values()
                refs = {media.get("schema", {}).get("$ref") for media in content}
                if str(status)[0] in "45" and refs & {_PROBLEM_REF, _FASTAPI_422_REF}:
                    response["content"] = problem
                    if _FASTAPI_422_REF in refs:
                        response["description"] = f"`{ValidationFailed.code}`"
            # The middleware turns any unhandled exception into this, on every route.
            responses.setdefault("500", {"description": f"`{AppError.code}`", "content": problem})
        for unused in ("HTTPValidationError", "ValidationError"):
            if f"#/components/schemas/{unused}" not in orjson.dumps(schema).decode():
                components.pop(unused, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
