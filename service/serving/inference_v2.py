"""The Open Inference Protocol's (V2) shapes for the iris model, and its tensors as arrays.

The request's one input tensor is checked by pydantic (every value a finite number of
centimetres, as on `/v1/predict`), then its shape against its data: `[N, 4]`, row-major, flat
or nested. Answers are built straight from the probability array.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.serving.registry import CLASSES, FEATURES
from service.serving.schemas import Centimetres
from tenants.errors import ValidationFailed

MODEL_NAME = "iris"
PLATFORM = "onnxruntime_onnx"
OUTPUTS = ("predict", "predict_proba")
Parameters = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputTensor(_Strict):
    name: str = Field(max_length=256, examples=["input"])
    shape: list[int] = Field(min_length=2, max_length=2, examples=[[1, 4]])
    datatype: Literal["FP32", "FP64"]
    parameters: Parameters | None = None
    data: list[Centimetres] | list[list[Centimetres]] = Field(
        description="row-major, flat or nested", examples=[[5.1, 3.5, 1.4, 0.2]]
    )


class RequestedOutput(_Strict):
    name: Literal["predict", "predict_proba"]
    parameters: Parameters | None = None


class InferenceRequest(_Strict):
    id: str | None = Field(default=None, max_length=256)
    parameters: Parameters | None = None
    inputs: list[InputTensor] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = Field(default=None, max_length=2)


class OutputTensor(BaseModel):
    name: str
    datatype: Literal["INT64", "FP64"]
    shape: list[int]
    data: list[int] | list[float]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the versions this key may ask for by name")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters = Field(default_factory=dict)


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


def model_metadata(versions: list[str]) -> ModelMetadata:
    return ModelMetadata(
        name=MODEL_NAME,
        versions=versions,
        platform=PLATFORM,
        inputs=[TensorMetadata(name="input", datatype="FP32", shape=[-1, len(FEATURES)])],
        outputs=[
            TensorMetadata(name="predict", datatype="INT64", shape=[-1]),
            TensorMetadata(name="predict_proba", datatype="FP64", shape=[-1, len(CLASSES)]),
        ],
        parameters={"features": list(FEATURES), "classes": list(CLASSES)},
    )


def parse_request(body: bytes, *, binary: bool) -> InferenceRequest:
    """The request, validated by its pydantic model; 422 with every problem otherwise."""
    if binary:
        raise ValidationFailed(
            [{"loc": ["body"], "msg": "the binary tensor extension is not supported; send JSON"}]
        )
    try:
        return InferenceRequest.model_validate_json(body)
    except ValidationError as exc:
        raise ValidationFailed(
            [{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
        ) from None


def input_rows(request: InferenceRequest, *, cap: int) -> np.ndarray:
    """The input tensor as an [N, 4] float array, or 422 saying what does not fit."""
    tensor = request.inputs[0]
    loc: list[str | int] = ["body", "inputs", 0]
    rows, width = tensor.shape
    if width != len(FEATURES) or not 1 <= rows <= cap:
        raise ValidationFailed(
            [{"loc": [*loc, "shape"], "msg": f"shape must be [N, 4] with N from 1 to {cap}"}]
        )
    try:
        array = np.asarray(tensor.data, dtype=np.float64)
    except ValueError:  # ragged nested rows
        array = np.empty(0)
    if array.shape not in ((rows, width), (rows * width,)):
        raise ValidationFailed(
            [{"loc": [*loc, "data"], "msg": f"data must hold {rows} rows of {width} values"}]
        )
    return array.reshape(rows, width)


def inference_answer(request: InferenceRequest, version: str, proba: np.ndarray) -> dict[str, Any]:
    wanted = [o.name for o in request.outputs] if request.outputs else list(OUTPUTS)
    outputs = []
    for name in wanted:
        if name == "predict":
            labels = proba.argmax(axis=1)
            outputs.append(
                {"name": name, "datatype": "INT64", "shape": [len(labels)], "data": labels.tolist()}
            )
        else:
            outputs.append(
                {"name": name, "datatype": "FP64", "shape": list(proba.shape),
                 "data": proba.ravel().tolist()}
            )  # fmt: skip
    answer: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": version}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = outputs
    return answer
