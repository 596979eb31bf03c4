"""FastAPI's native OpenTelemetry, switched by TENANTSERVE_OTEL_ENABLED, and our span attributes.

NOTE: FastAPI 0.165 turns its telemetry on by default, with the global (no-op) providers, and
that costs ~5% of a worker with nothing configured. Here it is off unless the operator asks;
then FastAPI configures the SDK from the standard `OTEL_*` variables (`auto_configure`).
"""

from __future__ import annotations

from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace

from auth.principals import Customer
from service.config import Settings


def telemetry_config(settings: Settings) -> TelemetryConfig:
    enabled = settings.otel_enabled
    return {
        "tracing": enabled,
        "metrics": enabled,
        "logs": enabled,
        "operation_spans": enabled,
        "auto_configure": enabled,
    }


def annotate_span(customer: Customer, model_version: str) -> None:
    """Who asked and which version answered, on the request's span (if one is recorded)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "tenantserve.tenant_id": customer.tenant_id,
                "tenantserve.key_id": customer.key_id,
                "tenantserve.model_version": model_version,
            }
        )
