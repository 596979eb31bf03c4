"""Training: scikit-learn fits, skl2onnx exports, ONNX Runtime's answers are checked against it.

Imported only by `tenantserve models train|upgrade`, by the tests, and by the default-version
bootstrap of `tenantserve serve`, which runs it in a child process
(`python -m service.serving.training MODEL_DIR`): a worker never imports scikit-learn or scipy,
which would cost it ~90 MB and seconds of start-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import ClassifierMixin
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from service.serving.admission import (
    RANDOM_ROWS,
    check_probabilities,
    compare,
    new_manifest,
    package_versions,
    probe_rows,
)
from service.serving.registry import (
    ALGORITHMS,
    DEFAULT_VERSIONS,
    FEATURES,
    Algorithm,
    Manifest,
    ModelError,
    VersionExists,
    add_version,
    check_new_version,
    legacy_manifest,
    legacy_versions,
    list_versions,
    replace_legacy_version,
)
from service.serving.runtime import OnnxClassifier

INPUT = "features"
# Pinned, so that an upgrade of skl2onnx cannot write a graph older runtimes refuse:
# onnxruntime >= 1.20 (pyproject's floor) runs opset 21.
TARGET_OPSET = {"": 21, "ai.onnx.ml": 3}


def fit(algorithm: Algorithm) -> tuple[ClassifierMixin, dict[str, float]]:
    """`algorithm` fitted on scikit-learn's bundled iris data (deterministic), and its metrics."""
    features, labels = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.2, random_state=42, stratify=labels
    )
    estimator: ClassifierMixin
    if algorithm == "logreg":
        estimator = LogisticRegression(max_iter=1000)
    else:
        estimator = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    estimator.fit(x_train, y_train)
    accuracy = float(np.mean(estimator.predict(x_test) == y_test))
    return estimator, {"test_accuracy": round(accuracy, 4), "test_rows": len(y_test)}


def export(estimator: ClassifierMixin) -> bytes:
    """The fitted model as an ONNX graph: float [N, 4] in, a plain probability tensor out."""
    proto = to_onnx(
        estimator,
        initial_types=[(INPUT, FloatTensorType([None, len(FEATURES)]))],
        options={id(estimator): {"zipmap": False}},  # a [N, 3] tensor, not a list of dicts
        target_opset=TARGET_OPSET,
    )
    return bytes(proto.SerializeToString())


def build(
    version: str, algorithm: Algorithm, created_at: str | None = None
) -> tuple[Manifest, bytes]:
    """Fit, export, and check ONNX Runtime against scikit-learn; refuses a version that differs."""
    estimator, metrics = fit(algorithm)
    artifact = export(estimator)
    classifier = OnnxClassifier(artifact)
    iris, _ = load_iris(return_X_y=True)
    rows = np.vstack([iris, probe_rows()])
    valid = check_probabilities(classifier.raw(rows), len(rows))
    agreement = compare(estimator.predict_proba(rows), classifier.predict_proba(rows))
    parity = {
        "reference": "scikit-learn predict_proba",
        "iris_rows": len(iris),
        "random_rows": RANDOM_ROWS,
        "corner_rows": len(rows) - len(iris) - RANDOM_ROWS,
        **valid,
        **agreement,
    }
    manifest = new_manifest(
        version=version,
        algorithm=algorithm,
        artifact=artifact,
        classifier=classifier,
        metrics=metrics,
        parity=parity,
        libraries=package_versions("scikit-learn", "skl2onnx"),
        created_at=created_at,
    )
    return manifest, artifact


def train(model_dir: Path, version: str, algorithm: Algorithm) -> Manifest:
    """Train `algorithm` as version `version` and add it to the registry."""
    check_new_version(model_dir, version)  # before seconds of work, not after
    manifest, artifact = build(version, algorithm)
    add_version(model_dir, manifest, artifact)
    return manifest


def ensure_default_versions(model_dir: Path) -> list[str]:
    """Train the default versions when the registry holds none; returns what was trained."""
    if list_versions(model_dir):
        return []
    trained = []
    for version, algorithm in DEFAULT_VERSIONS:
        try:
            train(model_dir, version, algorithm)
            trained.append(version)
        except VersionExists:
            pass  # another process starting on the same registry trained it first
    return trained


def upgrade_legacy_versions(model_dir: Path) -> list[str]:
    """Retrain every skops version of the earlier release as ONNX, under the same name.

    Training is deterministic on the same data, so a version comes back as the model it was;
    it keeps its `created_at`, so the newest (served by default) stays the newest.
    """
    upgraded = []
    for version in legacy_versions(model_dir):
        old = legacy_manifest(model_dir, version)
        algorithm = next((a for a in ALGORITHMS if a == old.get("algorithm")), None)
        if algorithm is None:
            raise ModelError(f"legacy version {version!r} has an unknown algorithm; remove it")
        manifest, artifact = build(version, algorithm, created_at=old.get("created_at"))
        replace_legacy_version(model_dir, manifest, artifact)
        upgraded.append(version)
    return upgraded


def main(argv: list[str]) -> None:
    """`python -m service.serving.training MODEL_DIR`: the defaults into an empty registry."""
    print(json.dumps(ensure_default_versions(Path(argv[1]))))


if __name__ == "__main__":
    main(sys.argv)
