"""The predict routes' shapes, for OpenAPI; bodies are parsed by `features.py` for speed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Centimetres = Annotated[float, Field(gt=0, le=30, allow_inf_nan=False, examples=[5.1])]


class Features(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
            ]
        },
    )
    sepal_length: Centimetres
    sepal_width: Centimetres
    petal_length: Centimetres
    petal_width: Centimetres


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[Features] = Field(
        min_length=1, description="1 … the smaller of the tenant's and the server's batch cap"
    )


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


class ModelsPublic(BaseModel):
    active: str
    versions: list[ModelVersionPublic]
