"""The model registry: a folder per version, each an artifact plus a manifest.

The manifest records the artifact's sha256. `load_artifact` checks it before a single byte is
deserialised, and skops (not pickle) refuses any type outside `TRUSTED_TYPES`, so a tampered or
foreign file is refused instead of executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sklearn
import skops.io as skops_io
from sklearn.base import ClassifierMixin
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

ARTIFACT = "model.skops"
MANIFEST = "manifest.json"
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSES = ("setosa", "versicolor", "virginica")
FEATURE_BOUNDS = {"exclusive_min": 0.0, "maximum": 30.0}
# Types beyond skops' built-in safe set that our own artifacts legitimately contain.
TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
Algorithm = Literal["logreg", "forest"]
# A fresh install gets these, oldest first: the newest (served by default) is the cheap one.
DEFAULT_VERSIONS: tuple[tuple[str, Algorithm], ...] = (
    ("v1-forest", "forest"),
    ("v2-logreg", "logreg"),
)


class ModelError(Exception):
    """A version that does not exist, or an artifact that must not be loaded."""


@dataclass(frozen=True, slots=True)
class Manifest:
    version: str
    algorithm: str
    sha256: str
    metrics: dict[str, float]
    created_at: str
    classes: list[str]
    features: list[str]
    feature_bounds: dict[str, float]
    libraries: dict[str, str]

    def public(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "algorithm": self.algorithm,
            "sha256": self.sha256,
            "metrics": self.metrics,
            "created_at": self.created_at,
        }


def _estimator(algorithm: Algorithm) -> ClassifierMixin:
    if algorithm == "logreg":
        return LogisticRegression(max_iter=1000)
    return RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)


def train(model_dir: Path, version: str, algorithm: Algorithm) -> Manifest:
    """Train `algorithm` on scikit-learn's bundled iris data (deterministic) and add it."""
    if not VERSION_PATTERN.fullmatch(version):
        raise ModelError(f"invalid version name {version!r}: use letters, digits, '.', '_', '-'")
    target = model_dir / version
    if target.exists():
        raise ModelError(f"version {version!r} already exists in {model_dir}")
    features, labels = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.2, random_state=42, stratify=labels
    )
    estimator = _estimator(algorithm)
    estimator.fit(x_train, y_train)
    accuracy = float(np.mean(estimator.predict(x_test) == y_test))
    artifact = skops_io.dumps(estimator)

    staging = model_dir / f".{version}.tmp"
    staging.mkdir(parents=True, exist_ok=False)
    (staging / ARTIFACT).write_bytes(artifact)
    manifest = Manifest(
        version=version,
        algorithm=algorithm,
        sha256=hashlib.sha256(artifact).hexdigest(),
        metrics={"test_accuracy": round(accuracy, 4), "test_rows": len(y_test)},
        created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        classes=list(CLASSES),
        features=list(FEATURES),
        feature_bounds=FEATURE_BOUNDS,
        libraries={
            "python": platform.python_version(),
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
            "skops": package_version("skops"),
        },
    )
    (staging / MANIFEST).write_text(json.dumps(dataclasses.asdict(manifest), indent=2))
    staging.rename(target)  # atomic: a half-written version is never visible
    return manifest


def ensure_default_versions(model_dir: Path) -> list[str]:
    """Train the default versions when the registry holds none; returns what was trained."""
    if list_versions(model_dir):
        return []
    for version, algorithm in DEFAULT_VERSIONS:
        train(model_dir, version, algorithm)
    return [version for version, _ in DEFAULT_VERSIONS]


def read_manifest(model_dir: Path, version: str) -> Manifest:
    if not VERSION_PATTERN.fullmatch(version):
        raise ModelError(f"unknown model version {version!r}")
    path = model_dir / version / MANIFEST
    try:
        return Manifest(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"unknown model version {version!r}") from None
    except (ValueError, TypeError) as exc:
        raise ModelError(f"manifest of {version!r} is unreadable: {exc}") from None


def list_versions(model_dir: Path) -> list[Manifest]:
    """Every version in the registry, oldest first."""
    if not model_dir.is_dir():
        return []
    manifests = [
        read_manifest(model_dir, entry.name)
        for entry in model_dir.iterdir()
        if (entry / MANIFEST).is_file() and not entry.name.startswith(".")
    ]
    return sorted(manifests, key=lambda m: (m.created_at, m.version))


def newest_version(model_dir: Path) -> str:
    versions = list_versions(model_dir)
    if not versions:
        raise ModelError(f"no model versions in {model_dir}; run `tenantserve models train`")
    return versions[-1].version


def load_artifact(model_dir: Path, version: str) -> tuple[Manifest, ClassifierMixin]:
    """Verify the artifact's checksum, then deserialise it with skops' type allow-list."""
    manifest = read_manifest(model_dir, version)
    artifact = (model_dir / version / ARTIFACT).read_bytes()
    digest = hashlib.sha256(artifact).hexdigest()
    if digest != manifest.sha256:
        raise ModelError(
            f"artifact of model version {version!r} does not match its manifest's sha256; "
            "refusing to load it"
        )
    untrusted = set(skops_io.get_untrusted_types(data=artifact)) - set(TRUSTED_TYPES)
    if untrusted:
        raise ModelError(f"model version {version!r} contains untrusted types {sorted(untrusted)}")
    estimator = skops_io.loads(artifact, trusted=TRUSTED_TYPES)
    if list(getattr(estimator, "classes_", [])) != list(range(len(manifest.classes))):
        raise ModelError(f"model version {version!r} does not predict the manifest's classes")
    return manifest, estimator
