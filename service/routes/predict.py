"""`POST /v1/predict` and `/v1/predict/batch`: limit → validate → quota → predict → answer."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from auth.dependencies import API_KEY_SECURITY
from auth.principals import Customer
from service import metrics
from service.errors import (
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
    error_responses,
)
from service.guards import predict_caller, reserve_quota
from service.serving.features import parse_batch, parse_single
from service.serving.runtime import encode_predictions
from service.serving.schemas import BatchPrediction, BatchRequest, Features, Prediction
from service.state import AppState

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
    request: Request, state: AppState, customer: Customer, rows: np.ndarray
) -> tuple[str, list[dict[str, Any]]]:
    if state.settings.log_features:
        request.state.features = rows.tolist()
    reservation = await reserve_quota(state, customer, len(rows))
    try:
        model, proba = await state.batcher.predict(rows)
    except BaseException:
        await reservation.release()
        raise
    request.state.items = len(rows)
    request.state.model_version = model.version
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
    state, customer = await predict_caller(request)
    rows = parse_single(await request.body())
    _, predictions = await _predict(request, state, customer, rows)
    return _json(predictions[0])


@router.post(
    "/v1/predict/batch",
    response_model=BatchPrediction,
    responses=_ERRORS,
    openapi_extra=_openapi(BatchRequest),
    summary="Predict many irises in one call, answers in input order",
)
async def predict_batch(request: Request) -> Response:
    state, customer = await predict_caller(request)
    cap = min(customer.max_batch_size, state.settings.max_batch_size)
    rows = parse_batch(await request.body(), cap=cap)
    metrics.BATCH_SIZE.observe(len(rows))
    version, predictions = await _predict(request, state, customer, rows)
    return _json({"predictions": predictions, "model_version": version})
