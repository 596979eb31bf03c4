"""The model registry: what `tenantserve models train` writes, and what a server refuses to load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skl2onnx
import sklearn
from fastapi.testclient import TestClient
from sklearn.datasets import load_iris

from service.config import Settings
from service.main import create_app
from service.serving.admission import TOLERANCE, probe_rows
from service.serving.registry import Algorithm, ModelError, read_manifest
from service.serving.runtime import load_model
from service.serving.training import fit, train
from tests.conftest import FEATURES, bearer, free_port, new_customer

# Each algorithm's default version.
ALGORITHMS: dict[Algorithm, str] = {"logreg": "v2-logreg", "forest": "v1-forest"}
TAMPERED = "v1-forest"
# One textbook sample per species (Fisher's iris data), in the contract's class order.
KNOWN_SAMPLES = np.array([[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.7, 3.0, 5.2, 2.3]])


def start_tenantserve(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """The real command line, with only the settings given (none inherited, no `.env`)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSERVE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        env={**clean, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def completed(
    process: subprocess.Popen[str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_tenantserve(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return completed(start_tenantserve(*args, env=env, cwd=cwd))


def serve_env(model_dir: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "TENANTSERVE_ENV": "development",
        "TENANTSERVE_MODEL_DIR": str(model_dir),
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'tenantserve.db'}",
        "TENANTSERVE_USAGE_JOURNAL_DIR": str(tmp_path / "journal"),
        "TENANTSERVE_HOST": "127.0.0.1",
        "TENANTSERVE_PORT": str(free_port()),
        **extra,
    }


def assert_refused_to_start(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """One line saying why, before any worker starts: no traceback to dig through."""
    assert done.returncode != 0
    refusal = done.stderr.strip()
    assert refusal.startswith("tenantserve: refusing to start:"), refusal
    assert len(refusal.splitlines()) == 1, refusal
    for word in words:
        assert word in refusal, refusal
    assert "Traceback" not in done.stderr + done.stdout
    assert '"event":"started"' not in done.stdout
    return refusal


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_registry(model_dir: Path, tmp_path: Path) -> Path:
    registry = tmp_path / "models"
    shutil.copytree(model_dir, registry)
    return registry


@pytest.fixture(scope="module")
def cli_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Algorithm, Any]]:
    """A registry filled by `tenantserve models train`, one version per algorithm."""
    directory = tmp_path_factory.mktemp("cli-registry")
    env = {"TENANTSERVE_MODEL_DIR": str(directory / "models")}
    # Side by side: each process spends seconds importing scikit-learn.
    processes = {
        algorithm: start_tenantserve(
            *("models", "train", "--version", f"t-{algorithm}", "--algorithm", algorithm),
            env=env,
            cwd=directory,
        )
        for algorithm in ALGORITHMS
    }
    printed = {}
    for algorithm, process in processes.items():
        done = completed(process)
        assert done.returncode == 0, done.stderr
        printed[algorithm] = json.loads(done.stdout)
    return directory / "models", printed


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_train_writes_an_onnx_graph_and_a_complete_manifest(
    cli_registry: tuple[Path, dict[Algorithm, Any]], algorithm: Algorithm
) -> None:
    registry, printed = cli_registry
    version = f"t-{algorithm}"
    assert sorted(p.name for p in (registry / version).iterdir()) == ["manifest.json", "model.onnx"]
    manifest = json.loads((registry / version / "manifest.json").read_text())
    assert manifest["version"] == version
    assert manifest["algorithm"] == algorithm
    assert manifest["sha256"] == sha256_of(registry / version / "model.onnx")
    assert manifest["opset"]["ai.onnx"] == 21
    assert (manifest["input_name"], manifest["output_name"]) == ("features", "probabilities")
    assert manifest["metrics"]["test_accuracy"] >= 0.9
    assert manifest["metrics"]["test_rows"] > 0
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.tzinfo is not None
    assert abs((datetime.now(UTC) - created).total_seconds()) < 600
    assert manifest["classes"] == ["setosa", "versicolor", "virginica"]
    assert manifest["features"] == list(FEATURES)
    assert manifest["feature_bounds"] == {"exclusive_min": 0.0, "maximum": 30.0}
    parity = manifest["parity"]
    assert parity["reference"] == "scikit-learn predict_proba"
    assert parity["iris_rows"] == 150 and parity["random_rows"] >= 10_000
    assert parity["rows"] == 150 + parity["random_rows"] + parity["corner_rows"]
    assert parity["class_mismatches"] == 0
    assert 0 <= parity["max_abs_difference"] <= parity["tolerance"] == 1e-5
    libraries = manifest["libraries"]
    assert libraries["scikit-learn"] == sklearn.__version__
    assert libraries["skl2onnx"] == skl2onnx.__version__
    assert libraries["numpy"] == np.__version__
    assert {"python", "onnx", "onnxruntime"} <= set(libraries)
    # The command prints the public part of what it wrote.
    assert printed[algorithm] == {
        key: manifest[key] for key in ("version", "algorithm", "sha256", "metrics", "created_at")
    }


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_training_is_deterministic(
    cli_registry: tuple[Path, dict[Algorithm, Any]], model_dir: Path, algorithm: Algorithm
) -> None:
    """The CLI's version and the default one, trained in other processes, are the same bytes."""
    registry, _ = cli_registry
    default = read_manifest(model_dir, ALGORITHMS[algorithm])
    again = read_manifest(registry, f"t-{algorithm}")
    assert again.sha256 == default.sha256
    assert again.metrics == default.metrics


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_served_answers_agree_with_scikit_learn(model_dir: Path, algorithm: Algorithm) -> None:
    """The ONNX graph as served, against scikit-learn's own model, across the valid inputs."""
    served = load_model(model_dir, ALGORITHMS[algorithm])
    estimator, _ = fit(algorithm)
    iris, _ = load_iris(return_X_y=True)
    rows = np.vstack([iris, probe_rows(), KNOWN_SAMPLES])
    proba = served.predict_proba(rows)
    assert proba.dtype == np.float64 and proba.shape == (len(rows), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(proba, estimator.predict_proba(rows), rtol=0, atol=TOLERANCE)
    assert np.array_equal(proba.argmax(axis=1), estimator.predict(rows))
    assert proba[-3:].argmax(axis=1).tolist() == [0, 1, 2], "setosa, versicolor, virginica"


def test_train_refuses_an_existing_version(cli_registry: tuple[Path, dict[Algorithm, Any]]) -> None:
    registry, printed = cli_registry
    with pytest.raises(ModelError, match="already exists"):
        train(registry, "t-logreg", "forest")
    assert read_manifest(registry, "t-logreg").algorithm == "logreg"
    assert printed["logreg"]["sha256"] == sha256_of(registry / "t-logreg" / "model.onnx")
    assert not [p for p in registry.iterdir() if p.name.startswith(".")], "no staging left"


@pytest.fixture
def tampered_registry(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the registry in which one byte of one artifact is flipped."""
    registry = copy_registry(model_dir, tmp_path)
    artifact = registry / TAMPERED / "model.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    return registry


def test_a_tampered_artifact_is_refused_at_load(tampered_registry: Path) -> None:
    with pytest.raises(ModelError, match=rf"'{TAMPERED}'.*sha256"):
        load_model(tampered_registry, TAMPERED)
    assert load_model(tampered_registry, "v2-logreg").version == "v2-logreg"


def record_sha256(registry: Path, version: str, artifact: bytes) -> None:
    """Write `artifact`'s sha256 into the version's manifest, as a forger would."""
    manifest_path = registry / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(artifact).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def test_a_manifest_with_the_wrong_sha256_is_refused(model_dir: Path, tmp_path: Path) -> None:
    registry = copy_registry(model_dir, tmp_path)
    record_sha256(registry, "v2-logreg", b"another artifact")
    with pytest.raises(ModelError, match=r"'v2-logreg'.*sha256"):
        load_model(registry, "v2-logreg")


def test_a_file_that_is_not_onnx_is_refused_even_with_a_matching_sha256(
    model_dir: Path, tmp_path: Path
) -> None:
    """The checksum proves the bytes are the ones registered, not that they are a model."""
    registry = copy_registry(model_dir, tmp_path)
    garbage = b"MZ\x90\x00 this is no ONNX graph " * 50
    (registry / "v2-logreg" / "model.onnx").write_bytes(garbage)
    record_sha256(registry, "v2-logreg", garbage)
    with pytest.raises(ModelError, match=r"'v2-logreg'.*not a usable ONNX model"):
        load_model(registry, "v2-logreg")


def test_the_server_will_not_start_on_a_tampered_artifact(
    tampered_registry: Path, tmp_path: Path
) -> None:
    env = serve_env(tampered_registry, tmp_path, TENANTSERVE_MODEL_VERSION=TAMPERED)
    assert_refused_to_start(run_tenantserve("serve", env=env, cwd=tmp_path), TAMPERED, "sha256")


def test_activating_a_tampered_version_is_refused(
    make_settings: Callable[..., Settings], tampered_registry: Path
) -> None:
    app = create_app(make_settings(model_dir=tampered_registry))
    with TestClient(app, raise_server_exceptions=False) as client:
        customer = new_customer(client)
        admin = bearer(customer.token)
        refused = client.post(f"/v1/admin/models/{TAMPERED}/activate", headers=admin)
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert "sha256" in refused.json()["detail"]
        listing = client.get("/v1/admin/models", headers=admin).json()
        assert listing["active"] == "v2-logreg"
        served = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
        assert served.status_code == 200, served.text
        assert served.json()["model_version"] == "v2-logreg"


def legacy_registry(model_dir: Path, tmp_path: Path) -> Path:
    """A registry as the release before ONNX wrote it: `model.skops` and its manifest."""
    registry = tmp_path / "legacy-models"
    for version, algorithm, created_at in (
        ("v1-forest", "forest", "2026-11-01T10:00:00.000000+00:00"),
        ("v2-logreg", "logreg", "2026-11-01T10:00:01.000000+00:00"),
    ):
        folder = registry / version
        folder.mkdir(parents=True)
        artifact = f"skops zip of {version}".encode()
        (folder / "model.skops").write_bytes(artifact)
        old_manifest = {
            "version": version,
            "algorithm": algorithm,
            "sha256": hashlib.sha256(artifact).hexdigest(),
            "metrics": {"test_accuracy": 0.9, "test_rows": 30},
            "created_at": created_at,
            "classes": ["setosa", "versicolor", "virginica"],
            "features": list(FEATURES),
            "feature_bounds": {"exclusive_min": 0.0, "maximum": 30.0},
            "libraries": {"python": "3.11.7", "scikit-learn": "1.9.1", "skops": "0.16.0"},
        }
        (folder / "manifest.json").write_text(json.dumps(old_manifest))
    return registry


def test_a_legacy_registry_is_refused_with_the_command_that_converts_it(
    model_dir: Path, tmp_path: Path
) -> None:
    registry = legacy_registry(model_dir, tmp_path)
    env = serve_env(registry, tmp_path)
    refusal = assert_refused_to_start(
        run_tenantserve("serve", env=env, cwd=tmp_path),
        "v1-forest, v2-logreg",
        "`tenantserve models upgrade`",
    )
    assert "skops" in refusal
    listed = run_tenantserve("models", "list", env=env, cwd=tmp_path)
    assert listed.returncode != 0 and "`tenantserve models upgrade`" in listed.stderr
    assert not (registry / "v1-forest" / "model.onnx").exists(), "nothing trained by refusing"


def test_upgrade_retrains_legacy_versions_as_onnx_under_their_names(
    model_dir: Path, tmp_path: Path
) -> None:
    registry = legacy_registry(model_dir, tmp_path)
    env = serve_env(registry, tmp_path)
    done = run_tenantserve("models", "upgrade", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"upgraded": ["v1-forest", "v2-logreg"]}
    assert sorted(p.name for p in registry.iterdir()) == ["v1-forest", "v2-logreg"]
    for version in ("v1-forest", "v2-logreg"):
        assert sorted(p.name for p in (registry / version).iterdir()) == [
            "manifest.json",
            "model.onnx",
        ]
        upgraded = read_manifest(registry, version)
        # The same deterministic training as the defaults; the version keeps its place in time.
        assert upgraded.sha256 == read_manifest(model_dir, version).sha256
        assert upgraded.created_at.startswith("2026-11-01T10:00:0")
    listed = run_tenantserve("models", "list", env=env, cwd=tmp_path)
    assert [m["version"] for m in json.loads(listed.stdout)] == ["v1-forest", "v2-logreg"]
