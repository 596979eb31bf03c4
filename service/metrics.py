"""Prometheus metrics; correct across workers through prometheus_client's multiprocess mode.

`tenantserve serve` points `PROMETHEUS_MULTIPROC_DIR` at a fresh folder before the workers
start, and `/metrics` then sums every worker's files.
"""

from __future__ import annotations

import os
from functools import lru_cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "tenantserve_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
LATENCY = Histogram(
    "tenantserve_request_duration_seconds",
    "Time from request to response",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PREDICTIONS = Counter("tenantserve_predictions_total", "Predictions served", ["model_version"])
BATCH_SIZE = Histogram(
    "tenantserve_batch_items",
    "Items per batch request",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
)
REJECTIONS = Counter("tenantserve_rejections_total", "Requests refused by a limit", ["reason"])
USAGE_QUEUE = Gauge(
    "tenantserve_usage_queue_depth",
    "Usage records waiting to be written",
    multiprocess_mode="livesum",
)
MODEL_INFO = Gauge(
    "tenantserve_model_info",
    "1 for the model version a live worker serves, 0 for versions it served before",
    ["version", "algorithm"],
    multiprocess_mode="livemax",
)


# NOTE: `labels()` takes a lock and builds its key on every call (~2% of a worker on the
# prediction path); the children of the labels seen are kept instead. Nothing removes them.
@lru_cache(maxsize=1024)
def _request_children(route: str, method: str, status: int) -> tuple[Counter, Histogram]:
    return REQUESTS.labels(route, method, str(status)), LATENCY.labels(route)


@lru_cache(maxsize=256)
def _predictions_child(model_version: str) -> Counter:
    return PREDICTIONS.labels(model_version)


def request_answered(route: str, method: str, status: int, seconds: float) -> None:
    requests, latency = _request_children(route, method, status)
    requests.inc()
    latency.observe(seconds)


def predictions_served(model_version: str, count: int) -> None:
    _predictions_child(model_version).inc(count)


def model_served(version: str, algorithm: str) -> None:
    """Mark this worker's model, and zero the ones it served before.

    NOTE: zeroed, not removed: in multiprocess mode a removed label keeps its last value in
    the worker's file, so an activated-away version would show 1 for ever.
    """
    for family in MODEL_INFO.collect():
        for sample in family.samples:
            if sample.labels != {"version": version, "algorithm": algorithm}:
                MODEL_INFO.labels(**sample.labels).set(0)
    MODEL_INFO.labels(version, algorithm).set(1)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
