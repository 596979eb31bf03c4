"""Bring your own model: an ONNX classifier trained anywhere, admitted if it keeps the contract.

There is no scikit-learn model to compare it with, so what is checked is what can be: the bytes
are ONNX, ONNX Runtime knows every operator, the graph takes one float input [N, 4] and gives
probabilities [N, 3], and on every probe row those are finite, within [0, 1] and sum to 1. The
manifest says so (`parity.reference` is null). Nothing is written unless all of that holds.
"""

from __future__ import annotations

from pathlib import Path

from service.serving.admission import (
    RANDOM_ROWS,
    check_probabilities,
    new_manifest,
    parse_onnx,
    probe_rows,
)
from service.serving.registry import IMPORTED, Manifest, ModelError, add_version, check_new_version
from service.serving.runtime import OnnxClassifier, error_text

CHECKED = (
    "runs in ONNX Runtime on every probe row; answers [N, 3] finite probabilities in [0, 1] "
    "summing to 1 within the tolerance; no reference model to compare with"
)


def import_model(model_dir: Path, source: Path, version: str) -> Manifest:
    """Check the ONNX file `source` and add it to the registry as `version`."""
    check_new_version(model_dir, version)
    try:
        artifact = source.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {source}: {exc.strerror}") from None
    proto = parse_onnx(artifact)
    classifier = OnnxClassifier(artifact)
    rows = probe_rows()
    try:
        raw = classifier.raw(rows)
    except Exception as exc:  # ONNX Runtime's error types derive from Exception directly
        raise ModelError(f"the model fails on valid input: {error_text(exc)}") from None
    parity = {
        "reference": None,
        "checked": CHECKED,
        "random_rows": RANDOM_ROWS,
        "corner_rows": len(rows) - RANDOM_ROWS,
        **check_probabilities(raw, len(rows)),
    }
    producer = f"{proto.producer_name} {proto.producer_version}".strip() or "unknown"
    manifest = new_manifest(
        version=version,
        algorithm=IMPORTED,
        artifact=artifact,
        classifier=classifier,
        metrics={},
        parity=parity,
        libraries={"producer": producer},
    )
    add_version(model_dir, manifest, artifact)
    return manifest
