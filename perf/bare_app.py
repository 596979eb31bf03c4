"""The reference point of the benchmark: uvicorn + FastAPI + the same pydantic body, nothing else.

tenantserve's requests/s are reported as a ratio to this app's, measured in the same run on the same
cores, because the machine is noisy and only ratios compare across runs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field

# Same bounds as the contract: the reference pays the same validation cost as the real endpoint.
Centimetres = Annotated[float, Field(gt=0, le=30, allow_inf_nan=False)]


class Features(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sepal_length: Centimetres
    sepal_width: Centimetres
    petal_length: Centimetres
    petal_width: Centimetres


# Encoded once: the reference measures the framework and body parsing, not a JSON encoder.
_PREDICTION = (
    b'{"prediction":0,"species":"setosa","probabilities":'
    b'{"setosa":1.0,"versicolor":0.0,"virginica":0.0},"model_version":"bare"}'
)
_HEALTH = b'{"status":"ok"}'

app = FastAPI(title="tenantserve bare reference", docs_url=None, redoc_url=None)


@app.get("/health")
async def health() -> Response:
    return Response(content=_HEALTH, media_type="application/json")


@app.post("/v1/predict")
async def predict(features: Features) -> Response:
    # The body is validated (that is the cost being measured) and deliberately not used.
    del features
    return Response(content=_PREDICTION, media_type="application/json")
