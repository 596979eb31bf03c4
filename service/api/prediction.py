"""What every prediction route does once its rows are valid: quota, model, metering."""

from __future__ import annotations

import numpy as np
from starlette.requests import Request

from auth.principals import Customer
from service import metrics
from service.api.context import context_of
from service.limits.quota import reserve_quota
from service.resources import Resources
from service.serving.runtime import LoadedModel
from service.telemetry import annotate_span


async def predict_rows(
    request: Request,
    resources: Resources,
    customer: Customer,
    rows: np.ndarray,
    *,
    version: str | None = None,
) -> tuple[LoadedModel, np.ndarray]:
    """Probabilities for `rows` from the tenant's version (or `version`, already allowed).

    The quota is reserved first and given back if no prediction is served; the request's
    context then says what to meter: how many predictions, by which version.
    """
    context = context_of(request)
    if resources.settings.log_features:
        context.features = rows.tolist()
    model = await resources.models.for_customer(customer, version)
    reservation = await reserve_quota(resources, customer, len(rows), held=context.quota)
    try:
        proba = await resources.batcher.predict(model, rows)
    except BaseException:
        await reservation.release()
        raise
    context.items = len(rows)
    context.quota = reservation
    context.model_version = model.version
    metrics.predictions_served(model.version, len(rows))
    annotate_span(customer, model.version)
    return model, proba
