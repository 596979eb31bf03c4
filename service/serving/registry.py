"""The model registry: a folder per version, each an ONNX graph plus its manifest.

An ONNX file is data, not code: nothing in it runs but the operators of ONNX Runtime. Its sha256
is in the manifest, and `read_artifact` compares them before a byte reaches a parser, so a
corrupt or tampered file is refused whole. This module knows files only: no scikit-learn, no
runtime, so every process can read the registry cheaply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ARTIFACT = "model.onnx"
MANIFEST = "manifest.json"
LEGACY_ARTIFACT = "model.skops"  # what the release before ONNX wrote; never loaded
UPGRADE_COMMAND = "tenantserve models upgrade"
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSES = ("setosa", "versicolor", "virginica")
FEATURE_BOUNDS = {"exclusive_min": 0.0, "maximum": 30.0}
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
Algorithm = Literal["logreg", "forest"]
ALGORITHMS: tuple[Algorithm, ...] = ("logreg", "forest")
IMPORTED = "imported"  # the algorithm of a version trained elsewhere
# A fresh install gets these, oldest first: the newest (served by default) is the cheap one.
DEFAULT_VERSIONS: tuple[tuple[str, Algorithm], ...] = (
    ("v1-forest", "forest"),
    ("v2-logreg", "logreg"),
)


class ModelError(Exception):
    """A version that does not exist, or an artifact that must not be loaded."""


class VersionExists(ModelError):
    """The version name is taken: a registry version is never overwritten."""


@dataclass(frozen=True, slots=True)
class Manifest:
    version: str
    algorithm: str
    sha256: str
    opset: dict[str, int]
    input_name: str
    output_name: str
    classes: list[str]
    features: list[str]
    feature_bounds: dict[str, float]
    metrics: dict[str, float]
    parity: dict[str, Any]
    """What was checked before the version was written, and the figures measured."""
    libraries: dict[str, str]
    created_at: str

    def public(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "algorithm": self.algorithm,
            "sha256": self.sha256,
            "metrics": self.metrics,
            "created_at": self.created_at,
        }


def check_new_version(model_dir: Path, version: str) -> None:
    """Refuse a version name that is malformed or already taken, before any work is done."""
    if not VERSION_PATTERN.fullmatch(version):
        raise ModelError(f"invalid version name {version!r}: use letters, digits, '.', '_', '-'")
    if (model_dir / version).exists():
        raise VersionExists(f"version {version!r} already exists in {model_dir}")


def add_version(model_dir: Path, manifest: Manifest, artifact: bytes) -> None:
    """Write a version whole or not at all: staged in a hidden folder, then renamed in."""
    check_new_version(model_dir, manifest.version)
    staging = _staged(model_dir, manifest, artifact)
    try:
        staging.rename(model_dir / manifest.version)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise VersionExists(f"version {manifest.version!r} already exists in {model_dir}") from None


def replace_legacy_version(model_dir: Path, manifest: Manifest, artifact: bytes) -> None:
    """Swap a legacy (skops) version's folder for its ONNX conversion, same name."""
    target = model_dir / manifest.version
    if not _is_legacy(target):
        raise ModelError(f"version {manifest.version!r} is not a legacy skops version")
    staging = _staged(model_dir, manifest, artifact)
    retired = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.legacy.", dir=model_dir))
    target.rename(retired / manifest.version)
    staging.rename(target)
    shutil.rmtree(retired)


def _staged(model_dir: Path, manifest: Manifest, artifact: bytes) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=model_dir))
    try:
        (staging / ARTIFACT).write_bytes(artifact)
        (staging / MANIFEST).write_text(json.dumps(dataclasses.asdict(manifest), indent=2))
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.chmod(0o755)  # mkdtemp makes it private; a version is readable like any file
    return staging


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(model_dir: Path, version: str) -> Manifest:
    if not VERSION_PATTERN.fullmatch(version):
        raise ModelError(f"unknown model version {version!r}")
    folder = model_dir / version
    if _is_legacy(folder):
        raise ModelError(_legacy_message(model_dir, [version]))
    try:
        return Manifest(**json.loads((folder / MANIFEST).read_text()))
    except FileNotFoundError:
        raise ModelError(f"unknown model version {version!r}") from None
    except (ValueError, TypeError) as exc:
        raise ModelError(f"manifest of {version!r} is unreadable: {exc}") from None


def read_artifact(model_dir: Path, version: str) -> tuple[Manifest, bytes]:
    """The manifest and the artifact's bytes, refused unless they match its sha256."""
    manifest = read_manifest(model_dir, version)
    try:
        artifact = (model_dir / version / ARTIFACT).read_bytes()
    except OSError as exc:
        raise ModelError(f"artifact of model version {version!r} is unreadable: {exc}") from None
    if sha256_hex(artifact) != manifest.sha256:
        raise ModelError(
            f"artifact of model version {version!r} does not match its manifest's sha256; "
            "refusing to load it"
        )
    return manifest, artifact


def list_versions(model_dir: Path) -> list[Manifest]:
    """Every (ONNX) version in the registry, oldest first; legacy folders are not versions."""
    if not model_dir.is_dir():
        return []
    manifests = [
        read_manifest(model_dir, entry.name)
        for entry in model_dir.iterdir()
        if (entry / MANIFEST).is_file() and not entry.name.startswith(".") and not _is_legacy(entry)
    ]
    return sorted(manifests, key=lambda m: (m.created_at, m.version))


def newest_version(model_dir: Path) -> str:
    versions = list_versions(model_dir)
    if not versions:
        raise ModelError(f"no model versions in {model_dir}; run `tenantserve models train`")
    return versions[-1].version


def legacy_versions(model_dir: Path) -> list[str]:
    """Versions written by the release before ONNX (a `model.skops` and no `model.onnx`)."""
    if not model_dir.is_dir():
        return []
    return sorted(
        entry.name
        for entry in model_dir.iterdir()
        if not entry.name.startswith(".") and _is_legacy(entry)
    )


def legacy_manifest(model_dir: Path, version: str) -> dict[str, Any]:
    """What the earlier release recorded of a legacy version (its algorithm, its created_at)."""
    try:
        manifest: dict[str, Any] = json.loads((model_dir / version / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"manifest of legacy version {version!r} is unreadable: {exc}") from None
    return manifest


def refuse_legacy_versions(model_dir: Path) -> None:
    """Stop with the one command that converts them, rather than serve half a registry."""
    legacy = legacy_versions(model_dir)
    if legacy:
        raise ModelError(_legacy_message(model_dir, legacy))


def _is_legacy(folder: Path) -> bool:
    return (folder / LEGACY_ARTIFACT).is_file() and not (folder / ARTIFACT).exists()


def _legacy_message(model_dir: Path, versions: list[str]) -> str:
    return (
        f"model registry {model_dir} holds skops versions of an earlier release "
        f"({', '.join(versions)}), which this release does not load; "
        f"run `{UPGRADE_COMMAND}` once to retrain them as ONNX"
    )
