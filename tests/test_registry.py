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
import sklearn
import skops.io as skops_io
from fastapi.testclient import TestClient
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from service.config import Settings
from service.main import create_app
from service.serving.registry import ModelError, read_manifest, train
from service.serving.runtime import load_model
from tests.conftest import FEATURES, bearer, free_port, new_customer

ALGORITHMS = {"logreg": "v2-logreg", "forest": "v1-forest"}  # algorithm → default version
TAMPERED = "v1-forest"


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


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe_rows() -> np.ndarray:
    """Iris itself and a spread of other valid inputs."""
    iris, _ = load_iris(return_X_y=True)
    spread = np.random.default_rng(7).uniform(0.01, 30.0, size=(500, 4))
    return np.vstack([iris, spread])


@pytest.fixture(scope="module")
def cli_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
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
def test_train_writes_a_complete_manifest(
    cli_registry: tuple[Path, dict[str, Any]], algorithm: str
) -> None:
    registry, printed = cli_registry
    version = f"t-{algorithm}"
    manifest = json.loads((registry / version / "manifest.json").read_text())
    assert manifest["version"] == version
    assert manifest["algorithm"] == algorithm
    assert manifest["sha256"] == sha256_of(registry / version / "model.skops")
    assert manifest["metrics"]["test_accuracy"] >= 0.9
    assert manifest["metrics"]["test_rows"] > 0
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.tzinfo is not None
    assert abs((datetime.now(UTC) - created).total_seconds()) < 600
    assert manifest["classes"] == ["setosa", "versicolor", "virginica"]
    assert manifest["features"] == list(FEATURES)
    assert manifest["feature_bounds"] == {"exclusive_min": 0.0, "maximum": 30.0}
    libraries = manifest["libraries"]
    assert libraries["scikit-learn"] == sklearn.__version__
    assert libraries["numpy"] == np.__version__
    assert {"python", "skops"} <= set(libraries)
    # The command prints the public part of what it wrote.
    assert printed[algorithm] == {
        key: manifest[key] for key in ("version", "algorithm", "sha256", "metrics", "created_at")
    }


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_training_is_deterministic(
    cli_registry: tuple[Path, dict[str, Any]], model_dir: Path, algorithm: str
) -> None:
    """The CLI's version and the default one, trained separately, answer identically."""
    registry, _ = cli_registry
    again = load_model(registry, f"t-{algorithm}")
    first = load_model(model_dir, ALGORITHMS[algorithm])
    rows = probe_rows()
    assert np.array_equal(again.predict_proba(rows), first.predict_proba(rows))
    assert again.manifest.metrics == first.manifest.metrics


def test_train_refuses_an_existing_version(cli_registry: tuple[Path, dict[str, Any]]) -> None:
    registry, printed = cli_registry
    with pytest.raises(ModelError, match="already exists"):
        train(registry, "t-logreg", "forest")
    assert read_manifest(registry, "t-logreg").algorithm == "logreg"
    assert printed["logreg"]["sha256"] == sha256_of(registry / "t-logreg" / "model.skops")


@pytest.fixture
def tampered_registry(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the registry in which one byte of one artifact is flipped."""
    registry = tmp_path / "models"
    shutil.copytree(model_dir, registry)
    artifact = registry / TAMPERED / "model.skops"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    return registry


def test_a_tampered_artifact_is_refused_at_load(tampered_registry: Path) -> None:
    with pytest.raises(ModelError, match=rf"'{TAMPERED}'.*sha256"):
        load_model(tampered_registry, TAMPERED)
    assert load_model(tampered_registry, "v2-logreg").version == "v2-logreg"


def test_the_server_will_not_start_on_a_tampered_artifact(
    tampered_registry: Path, tmp_path: Path
) -> None:
    env = {
        "TENANTSERVE_ENV": "development",
        "TENANTSERVE_MODEL_DIR": str(tampered_registry),
        "TENANTSERVE_MODEL_VERSION": TAMPERED,
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'tenantserve.db'}",
        "TENANTSERVE_USAGE_JOURNAL_DIR": str(tmp_path / "journal"),
        "TENANTSERVE_HOST": "127.0.0.1",
        "TENANTSERVE_PORT": str(free_port()),
    }
    done = run_tenantserve("serve", env=env, cwd=tmp_path)
    assert done.returncode != 0
    # One line saying why, before any worker starts: no traceback to dig through.
    refusal = done.stderr.strip()
    assert refusal.startswith("tenantserve: refusing to start:"), refusal
    assert TAMPERED in refusal and "sha256" in refusal
    assert "Traceback" not in done.stderr + done.stdout
    assert '"event":"started"' not in done.stdout


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


def test_an_artifact_with_an_untrusted_type_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """Even with a matching checksum: a pipeline that would call `os.system` is not loaded."""
    registry = tmp_path / "models"
    shutil.copytree(model_dir / "v2-logreg", registry / "v9-sneaky")
    sneaky = make_pipeline(FunctionTransformer(os.system), LogisticRegression())
    artifact = skops_io.dumps(sneaky)
    (registry / "v9-sneaky" / "model.skops").write_bytes(artifact)
    manifest_path = registry / "v9-sneaky" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(version="v9-sneaky", sha256=hashlib.sha256(artifact).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"untrusted types.*system"):
        load_model(registry, "v9-sneaky")
