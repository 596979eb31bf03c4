"""The Open Inference Protocol (V2, REST) for the iris model, behind the same gate as `/v1`.

KServe, Triton and MLServer clients point here unchanged, adding an `X-API-Key` header: the
same authentication (scope `predict`), rate limit, quota, usage record, log line and headers
as `/v1/predict`. Health and server metadata are public; everything about the model is the
caller's. The binary tensor extension is not supported: tensors travel as JSON.
"""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from auth.principals import Customer
from service.api import idempotency
from service.api.dependencies import PredictCaller, ResourcesDep
from service.api.prediction import predict_rows
from service.api.problems import error_responses
from service.api.routes.health import readiness
from service.resources import Resources
from service.serving.inference_v2 import (
    MODEL_NAME,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    inference_answer,
    input_rows,
    model_metadata,
    parse_request,
)
from service.serving.registry import ModelError, list_versions, read_manifest
from tenants.errors import (
    Forbidden,
    IdempotencyConflict,
    IdempotencyMismatch,
    InvalidCredentials,
    MissingCredentials,
    NotFound,
    NotReady,
    Overloaded,
    QuotaExceeded,
    RateLimited,
    TenantSuspended,
    ValidationFailed,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
_MODEL_ERRORS = error_responses(
    MissingCredentials, InvalidCredentials, Forbidden, TenantSuspended, NotFound,
    ValidationFailed, RateLimited, NotReady,
)  # fmt: skip
_INFER_ERRORS = error_responses(
    MissingCredentials, InvalidCredentials, Forbidden, TenantSuspended, NotFound,
    ValidationFailed, RateLimited, QuotaExceeded, Overloaded, NotReady, IdempotencyConflict,
    IdempotencyMismatch,
)  # fmt: skip


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="tenantserve", version=package_version("tenantserve"), extensions=[])


@router.get("/health/live", response_model=ServerLive)
async def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get(
    "/health/ready",
    response_model=ServerReady,
    responses={503: {"model": ServerReady, "description": "Not ready"}},
)
async def server_ready(resources: ResourcesDep) -> Response:
    ready = (await readiness(resources)).status == "ready"
    return Response(
        ServerReady(ready=ready).model_dump_json(),
        status_code=200 if ready else 503,
        media_type="application/json",
    )


def _chosen_version(
    resources: Resources, customer: Customer, model_name: str, requested: str | None
) -> str:
    """The version to serve: the tenant's own, or one it named and may choose."""
    if model_name != MODEL_NAME:
        raise NotFound(f"No model {model_name!r}; this server serves {MODEL_NAME!r}.")
    own = resources.models.version_for(customer)
    if requested is None or requested == own:
        return own
    if not customer.allow_version_choice:
        raise Forbidden(f"This tenant is served model version {own!r} and may not choose another.")
    try:
        read_manifest(resources.settings.model_dir, requested)
    except ModelError:
        raise NotFound(f"No version {requested!r} of model {MODEL_NAME!r}.") from None
    return requested


def _visible_versions(resources: Resources, customer: Customer) -> list[str]:
    if customer.allow_version_choice:
        return [m.version for m in list_versions(resources.settings.model_dir)]
    return [resources.models.version_for(customer)]


def _json(body: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


async def _metadata(
    resources: Resources, customer: Customer, model_name: str, version: str | None
) -> ModelMetadata:
    _chosen_version(resources, customer, model_name, version)
    return model_metadata(_visible_versions(resources, customer))


async def _ready(
    resources: Resources, customer: Customer, model_name: str, version: str | None
) -> Response:
    chosen = _chosen_version(resources, customer, model_name, version)
    try:
        await resources.models.for_customer(customer, chosen)
    except NotReady:
        return _json(ModelReady(name=MODEL_NAME, ready=False).model_dump(), 503)
    return _json(ModelReady(name=MODEL_NAME, ready=True).model_dump())


async def _infer(
    request: Request,
    resources: Resources,
    customer: Customer,
    model_name: str,
    version: str | None,
) -> Response:
    chosen = _chosen_version(resources, customer, model_name, version)
    raw = await request.body()
    body = parse_request(raw, binary=_BINARY_HEADER in request.headers)
    await idempotency.begin(request, resources, f"key:{customer.key_id}", raw)
    cap = min(customer.max_batch_size, resources.settings.max_batch_size)
    rows = input_rows(body, cap=cap)
    model, proba = await predict_rows(request, resources, customer, rows, version=chosen)
    return _json(inference_answer(body, model.version, proba))


# Clients send the body with any content type, or none: it is read as JSON whatever it says.
_INFER_BODY = {
    **idempotency.openapi_extra(200),
    "parameters": [idempotency.PARAMETER],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": InferenceRequest.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )}},
    }
}  # fmt: skip
_BINARY_HEADER = "inference-header-content-length"
_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ModelReady, "description": "The version cannot serve now"}
}


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=_MODEL_ERRORS)
async def model_metadata_default(
    model_name: str, customer: PredictCaller, resources: ResourcesDep
) -> ModelMetadata:
    return await _metadata(resources, customer, model_name, None)


@router.get(
    "/models/{model_name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_MODEL_ERRORS,
)
async def model_metadata_version(
    model_name: str, version: str, customer: PredictCaller, resources: ResourcesDep
) -> ModelMetadata:
    return await _metadata(resources, customer, model_name, version)


@router.get(
    "/models/{model_name}/ready", response_model=ModelReady, responses={**_MODEL_ERRORS, **_READY}
)
async def model_ready_default(
    model_name: str, customer: PredictCaller, resources: ResourcesDep
) -> Response:
    return await _ready(resources, customer, model_name, None)


@router.get(
    "/models/{model_name}/versions/{version}/ready",
    response_model=ModelReady,
    responses={**_MODEL_ERRORS, **_READY},
)
async def model_ready_version(
    model_name: str, version: str, customer: PredictCaller, resources: ResourcesDep
) -> Response:
    return await _ready(resources, customer, model_name, version)


@router.post(
    "/models/{model_name}/infer",
    response_model=InferenceResponse,
    responses=_INFER_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def infer_default(
    request: Request, model_name: str, customer: PredictCaller, resources: ResourcesDep
) -> Response:
    return await _infer(request, resources, customer, model_name, None)


@router.post(
    "/models/{model_name}/versions/{version}/infer",
    response_model=InferenceResponse,
    responses=_INFER_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def infer_version(
    request: Request,
    model_name: str,
    version: str,
    customer: PredictCaller,
    resources: ResourcesDep,
) -> Response:
    return await _infer(request, resources, customer, model_name, version)
