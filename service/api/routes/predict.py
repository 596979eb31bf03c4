"""`POST /v1/predict` and `/v1/predict/batch`: limit → validate → quota → predict → answer."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from auth.principals import Customer
from service import metrics
from service.api.context import context_of
from service.api.dependencies import API_KEY_SECURITY, predict_caller
from service.api.problems import error_responses
from service.limits.quota import reserve_quota
from service.resources import Resources
from service.serving.features import parse_batch, parse_single
from service.serving.runtime import encode_predictions
from service.serving.schemas import BatchPrediction, BatchRequest, Features, Prediction
from tenants.errors import (
    Forbidden,
    InvalidCredentials,
    MissingCredentials,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    TenantSuspended,
    ValidationFailed,
)

router = APIRouter(tags=["predict"])
_ERRORS = error_responses(
    MissingCredentials, InvalidCredentials, Forbidden, TenantSuspended, PayloadTooLarge,
    ValidationFailed, RateLimited, QuotaExceeded, Overloaded, NotReady,
)  # fmt: skip


def _openapi(model: type[Features] | type[BatchRequest]) -> dict[str, Any]:
    """What the route's signature would have declared: its body and its caller's key."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        },
        "security": API_KEY_SECURITY,
    }


async def _predict(
    request: Request, resources: Resources, customer: Customer, rows: np.ndarray
) -> tuple[str, list[dict[str, Any]]]:
    context = context_of(request)
    if resources.settings.log_features:
        context.features = rows.tolist()
    reservation = await reserve_quota(resources, customer, len(rows))
    try:
        model, proba = await resources.batcher.predict(rows)
    except BaseException:
        await reservation.release()
        raise
    context.items = len(rows)
    context.model_version = model.version
    metrics.PREDICTIONS.labels(model.version).inc(len(rows))
    return model.version, encode_predictions(model, proba)


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.post(
    "/v1/predict",
    response_model=Prediction,
    responses=_ERRORS,
    openapi_extra=_openapi(Features),
    summary="Predict the species of one iris",
)
async def predict(request: Request) -> Response:
    resources, customer = await predict_caller(request)
    rows = parse_single(await request.body())
    _, predictions = await _predict(request, resources, customer, rows)
    return _json(predictions[0])


@router.post(
    "/v1/predict/batch",
    response_model=BatchPrediction,
    responses=_ERRORS,
    openapi_extra=_openapi(BatchRequest),
    summary="Predict many irises in one call, answers in input order",
)
async def predict_batch(request: Request) -> Response:
    resources, customer = await predict_caller(request)
    cap = min(customer.max_batch_size, resources.settings.max_batch_size)
    rows = parse_batch(await request.body(), cap=cap)
    metrics.BATCH_SIZE.observe(len(rows))
    version, predictions = await _predict(request, resources, customer, rows)
    return _json({"predictions": predictions, "model_version": version})
