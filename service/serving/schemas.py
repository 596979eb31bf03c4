"""The predict routes' bodies and answers: the one definition of a valid body, and its validator.

The request shapes are validated by pydantic-core straight from the raw body
(`validate_json`): no FastAPI body machinery, no intermediate Python parse. Rows are TypedDicts,
so a batch becomes a list of plain dicts (no model instance per row), read into one float array.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model, with_config
from typing_extensions import TypedDict

# strict: a number, never a numeric string or a boolean (lax mode would read "5.1" and true).
Centimetres = Annotated[float, Field(gt=0, le=30, allow_inf_nan=False, strict=True, examples=[5.1])]


@with_config(
    ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
            ]
        },
    )
)
class Features(TypedDict):
    sepal_length: Centimetres
    sepal_width: Centimetres
    petal_length: Centimetres
    petal_width: Centimetres


FEATURE_NAMES: tuple[str, ...] = tuple(Features.__annotations__)
"""The column order of the array handed to the model (the contract's feature order)."""

FEATURES_ADAPTER: TypeAdapter[Features] = TypeAdapter(Features)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[Features] = Field(min_length=1)


@cache
def batch_request_model(max_items: int) -> type[BatchRequest]:
    """The batch body for a server whose cap is `max_items` (TENANTSERVE_MAX_BATCH_SIZE)."""
    description = (
        f"1 … {max_items} items; a tenant's own `max_batch_size` may set a smaller cap, "
        "which is enforced too (422 over it)."
    )
    return create_model(
        "BatchRequest",
        __base__=BatchRequest,
        items=(
            list[Features],
            Field(min_length=1, max_length=max_items, description=description),
        ),
    )


def inline_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `$defs` references replaced by the definitions themselves.

    NOTE: pydantic refers to nested models as `#/$defs/…`, which an OpenAPI document cannot
    resolve from inside an operation; these models are not recursive, so inlining is exact.
    """
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                return resolve(definitions[reference.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


class Probabilities(BaseModel):
    setosa: float
    versicolor: float
    virginica: float


class Prediction(BaseModel):
    prediction: Literal[0, 1, 2]
    species: Literal["setosa", "versicolor", "virginica"]
    probabilities: Probabilities
    model_version: str


class BatchPrediction(BaseModel):
    predictions: list[Prediction]
    model_version: str


class ModelVersionPublic(BaseModel):
    version: str
    algorithm: str
    sha256: str
    metrics: dict[str, float]
    created_at: datetime


class RolloutPublic(BaseModel):
    version: str
    percent: int = Field(ge=1, le=99)


class ModelsPublic(BaseModel):
    active: str
    rollout: RolloutPublic | None = Field(
        description="a version serving a stable share of the unpinned tenants"
    )
    versions: list[ModelVersionPublic]


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    percent: int = Field(ge=0, le=100, description="0 ends the rollout; 100 activates")
