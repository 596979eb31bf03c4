"""What a new version goes through before it enters the registry, trained here or imported.

Its bytes must parse as ONNX, and its answers must be trustworthy across the whole valid input
space, not only near the training data: rows are probed with every measurement in (0, 30], as
the API accepts. A trained version must agree with the scikit-learn model it was exported from;
an imported one, with no reference to compare with, must answer every probe row with valid
probabilities. The manifest records what was checked and the figures measured.

Used by `tenantserve models train|import|upgrade` only, never by a worker.
"""

from __future__ import annotations

import itertools
import platform
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from service.serving.registry import (
    CLASSES,
    FEATURE_BOUNDS,
    FEATURES,
    Manifest,
    ModelError,
    sha256_hex,
)
from service.serving.runtime import OnnxClassifier

RANDOM_ROWS = 10_000
SEED = 20_240_601
TOLERANCE = 1e-5
"""Largest difference allowed between two answers' probabilities, and of a row's sum from 1."""
_SMALLEST = 1e-6  # the open lower bound, approached


def probe_rows() -> np.ndarray:
    """RANDOM_ROWS seeded rows in (0, 30], then every corner of that box."""
    high = FEATURE_BOUNDS["maximum"]
    # high - U[0, high) lies in (0, high]: the bounds the API accepts, both ends right.
    spread = high - np.random.default_rng(SEED).uniform(0.0, high, size=(RANDOM_ROWS, 4))
    corners = np.array(list(itertools.product((_SMALLEST, high), repeat=len(FEATURES))))
    return np.vstack([spread, corners])


def check_probabilities(raw: Any, rows: int) -> dict[str, float]:
    """Refuse anything but [rows, 3] finite probabilities in [0, 1] that sum to 1."""
    proba = np.asarray(raw)
    expected = (rows, len(CLASSES))
    if proba.shape != expected:
        raise ModelError(
            f"the model answered {rows} rows with shape {list(proba.shape)}; "
            f"the contract is {list(expected)} ({', '.join(CLASSES)})"
        )
    if not np.all(np.isfinite(proba)):
        raise ModelError("the model answered with NaN or infinite probabilities")
    if proba.min() < -TOLERANCE or proba.max() > 1 + TOLERANCE:
        raise ModelError(
            f"the model answered probabilities outside [0, 1] ({proba.min():.3g} … "
            f"{proba.max():.3g})"
        )
    sum_error = float(np.abs(proba.astype(np.float64).sum(axis=1) - 1.0).max())
    if sum_error > TOLERANCE:
        raise ModelError(
            f"the model's probabilities do not sum to 1 (off by up to {sum_error:.3g}; "
            f"allowed {TOLERANCE:g})"
        )
    return {"rows": rows, "max_row_sum_error": sum_error}


def compare(reference: np.ndarray, served: np.ndarray) -> dict[str, float]:
    """Refuse a version whose served answers differ from the reference model's."""
    mismatches = int(np.count_nonzero(reference.argmax(axis=1) != served.argmax(axis=1)))
    difference = float(np.abs(reference - served).max())
    if mismatches or difference > TOLERANCE:
        raise ModelError(
            f"the ONNX model disagrees with scikit-learn: {mismatches} of {len(reference)} rows "
            f"predict another class, probabilities differ by up to {difference:.3g} "
            f"(allowed {TOLERANCE:g})"
        )
    return {"max_abs_difference": difference, "class_mismatches": mismatches}


def parse_onnx(artifact: bytes) -> onnx.ModelProto:
    """The model's description (graph, operator sets, producer); refuses bytes that are not ONNX."""
    try:
        return onnx.load_model_from_string(artifact)
    except DecodeError:
        raise ModelError("not an ONNX model: its bytes are not an ONNX protobuf") from None


def package_versions(*names: str) -> dict[str, str]:
    return {name: package_version(name) for name in names}


def new_manifest(
    *,
    version: str,
    algorithm: str,
    artifact: bytes,
    classifier: OnnxClassifier,
    metrics: dict[str, float],
    parity: dict[str, Any],
    libraries: dict[str, str],
    created_at: str | None = None,
) -> Manifest:
    """The manifest of a version that passed its checks; `libraries` adds to the runtime's."""
    opset = parse_onnx(artifact).opset_import
    return Manifest(
        version=version,
        algorithm=algorithm,
        sha256=sha256_hex(artifact),
        opset={entry.domain or "ai.onnx": int(entry.version) for entry in opset},
        input_name=classifier.input_name,
        output_name=classifier.output_name,
        classes=list(CLASSES),
        features=list(FEATURES),
        feature_bounds=FEATURE_BOUNDS,
        metrics=metrics,
        parity={**parity, "tolerance": TOLERANCE},
        libraries={
            "python": platform.python_version(),
            **package_versions("numpy", "onnx", "onnxruntime"),
            **libraries,
        },
        created_at=created_at or datetime.now(UTC).isoformat(timespec="microseconds"),
    )
