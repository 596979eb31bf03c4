"""A loaded model version: an ONNX Runtime session behind one `predict_proba`, swapped atomically.

A worker needs nothing else to serve: no scikit-learn, no scipy, no unpickling. The graph is
checked against the iris contract (one float input [N, 4], probabilities [N, 3]) when the
session is made, so a version that would fail on its first request is refused at load instead.
A first few calls then measure what a row costs it: the micro-batcher decides by that whether
a call is cheap enough to run on the event loop.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.serving.registry import CLASSES, FEATURES, Manifest, ModelError, read_artifact

ProbaFn = Callable[[np.ndarray], np.ndarray]
PROBABILITIES = "probabilities"  # the output's name when a converter gives several
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
CALIBRATION_ROWS = 512


@dataclass(frozen=True, slots=True)
class LoadedModel:
    manifest: Manifest
    predict_proba: ProbaFn
    row_seconds: float = math.inf
    """What a row costs in a large call, measured at load (infinite: not measured)."""

    @property
    def version(self) -> str:
        return self.manifest.version


class OnnxClassifier:
    """An ONNX graph that answers the iris contract, in one ONNX Runtime session."""

    def __init__(self, artifact: bytes, *, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1  # nodes run one after another: these graphs are chains
        options.log_severity_level = 3  # errors only: its warnings are not JSON log lines
        if intra_op_threads > 1:
            # Waiting pool threads would otherwise spin, taking CPU from the other workers.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                artifact, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ONNX Runtime's error types derive from Exception directly
            raise ModelError(f"not a usable ONNX model: {error_text(exc)}") from None
        self.input_name = _contract_input(self._session.get_inputs())
        self.output_name = _contract_output(self._session.get_outputs())

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """The graph's own answer for `rows`: float32, one row of probabilities per row."""
        features = np.asarray(rows, dtype=np.float32)
        if len(features) == 1:
            # NOTE: ONNX Runtime computes a single row of a linear model with a GEMV kernel whose
            # last bit differs from the GEMM kernel every larger call takes. Two copies take the
            # GEMM path, so an answer never depends on the company it travelled in.
            return self._run(np.repeat(features, 2, axis=0))[:1]
        return self._run(features)

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """Probabilities in float64, each row summing to 1 (float32 sums are off by ~1e-7)."""
        proba = self.raw(rows).astype(np.float64)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def _run(self, features: np.ndarray) -> np.ndarray:
        outputs = self._session.run([self.output_name], {self.input_name: features})
        return np.asarray(outputs[0])


def _contract_input(inputs: Sequence[Any]) -> str:
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs; the contract is one: float [N, 4]")
    (tensor,) = inputs
    if tensor.type != "tensor(float)":
        raise ModelError(f"input {tensor.name!r} is {tensor.type}; the contract is tensor(float)")
    shape = list(tensor.shape)
    if len(shape) != 2 or isinstance(shape[0], int) or shape[1] != len(FEATURES):
        raise ModelError(
            f"input {tensor.name!r} has shape {_shape(shape)}; the contract is [N, "
            f"{len(FEATURES)}] with a dynamic N"
        )
    return str(tensor.name)


def _contract_output(outputs: Sequence[Any]) -> str:
    tables = [o for o in outputs if o.type == "tensor(float)" and len(o.shape) == 2]
    named = [o for o in tables if o.name == PROBABILITIES]
    if len(named) == 1 or len(tables) == 1:
        (tensor,) = named or tables
    else:
        found = ", ".join(f"{o.name!r} {o.type} {_shape(list(o.shape))}" for o in outputs)
        raise ModelError(
            f"no single float output of probabilities [N, {len(CLASSES)}] (outputs: {found}); "
            "export classifiers without a ZipMap"
        )
    width = tensor.shape[1]
    if isinstance(width, int) and width != len(CLASSES):
        raise ModelError(
            f"output {tensor.name!r} has shape {_shape(list(tensor.shape))}; "
            f"the contract is [N, {len(CLASSES)}] ({', '.join(CLASSES)})"
        )
    return str(tensor.name)


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def error_text(exc: Exception) -> str:
    """ONNX Runtime's message on one line, without its error-code prefix."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return _ORT_PREFIX.sub("", lines[0])


def load_model(model_dir: Path, version: str, *, intra_op_threads: int = 1) -> LoadedModel:
    """The version's verified artifact (sha256 before parsing) in a session of its own."""
    manifest, artifact = read_artifact(model_dir, version)
    if manifest.classes != list(CLASSES) or manifest.features != list(FEATURES):
        raise ModelError(f"model version {version!r} does not follow the iris contract")
    try:
        classifier = OnnxClassifier(artifact, intra_op_threads=intra_op_threads)
    except ModelError as exc:
        raise ModelError(f"model version {version!r}: {exc}") from None
    if (classifier.input_name, classifier.output_name) != (
        manifest.input_name,
        manifest.output_name,
    ):
        raise ModelError(f"model version {version!r} has other inputs or outputs than its manifest")
    proba = classifier.predict_proba
    try:
        row_seconds = _row_seconds(proba)
    except Exception as exc:  # ONNX Runtime's error types derive from Exception directly
        failure = error_text(exc)
        raise ModelError(f"model version {version!r} fails on valid rows: {failure}") from None
    return LoadedModel(manifest=manifest, predict_proba=proba, row_seconds=row_seconds)


def _row_seconds(predict_proba: ProbaFn) -> float:
    """A row's share of a large call, best of three, over rows spread across the features'
    range (a tree's path, and so its cost, depends on the values)."""
    rng = np.random.default_rng(0)
    rows = rng.uniform(0.1, 8.0, size=(CALIBRATION_ROWS, len(FEATURES)))
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        predict_proba(rows)
        best = min(best, time.perf_counter() - started)
    return best / CALIBRATION_ROWS
