"""Bring your own model: `tenantserve models import` admits an ONNX classifier trained anywhere
that keeps the contract, refuses anything else in one line, and never leaves half a version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from service.config import Settings
from service.main import create_app
from service.serving.importing import import_model
from service.serving.registry import ModelError, list_versions, read_manifest
from tests.conftest import bearer, new_customer
from tests.test_predict import SAMPLES

FOREIGN = "v9-foreign"


@pytest.fixture(scope="module")
def foreign_estimator() -> LogisticRegression:
    """A model trained elsewhere, differently from ours (its own regularisation)."""
    features, labels = load_iris(return_X_y=True)
    return LogisticRegression(C=0.5, max_iter=1000).fit(features, labels)


def graph(
    estimator: LogisticRegression,
    *,
    features: int = 4,
    classes: int = 3,
    batch: str | int = "N",
    dtype: int = TensorProto.FLOAT,
    softmax: bool = True,
    transposed: bool = False,
    extra_input: bool = False,
    operator: str = "Softmax",
) -> bytes:
    """The logistic regression's maths written as a plain ONNX graph, as another tool would."""
    numpy_type = helper.tensor_dtype_to_np_dtype(dtype)
    weights = np.zeros((features, classes), dtype=numpy_type)
    shared = (min(features, 4), min(classes, 3))
    weights[: shared[0], : shared[1]] = estimator.coef_.T[: shared[0], : shared[1]]
    bias = np.zeros(classes, dtype=numpy_type)
    bias[: shared[1]] = estimator.intercept_[: shared[1]]
    nodes = [
        helper.make_node("MatMul", ["x", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    output = "logits"
    if softmax:
        nodes.append(helper.make_node(operator, ["logits"], ["proba"], axis=1))
        output = "proba"
    if transposed:  # [3, N]: its width is N, known only when it runs
        nodes.append(helper.make_node("Transpose", [output], ["flipped"], perm=[1, 0]))
        output = "flipped"
    inputs = [helper.make_tensor_value_info("x", dtype, [batch, features])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", dtype, [batch, 1]))
    shape = ["C", "M"] if transposed else [batch, classes]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "foreign",
            inputs,
            [helper.make_tensor_value_info(output, dtype, shape)],
            [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
        producer_name="hand-written",
        producer_version="1",
    )
    model.ir_version = 10
    return bytes(model.SerializeToString())


def zipmap_export(estimator: LogisticRegression) -> bytes:
    """skl2onnx's default: probabilities as a list of {class: p} maps, not a tensor."""
    proto = to_onnx(estimator, initial_types=[("x", FloatTensorType([None, 4]))], target_opset=21)
    return bytes(proto.SerializeToString())


@pytest.fixture
def registry(model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the default registry to import into."""
    copy = tmp_path / "models"
    shutil.copytree(model_dir, copy)
    return copy


def registry_state(registry: Path) -> list[str]:
    """Every entry of the registry, hidden staging folders included."""
    return sorted(str(p.relative_to(registry)) for p in registry.rglob("*"))


REFUSED: dict[str, tuple[Callable[[LogisticRegression], bytes], str]] = {
    "not ONNX": (lambda _e: b"\x00\xffnot an ONNX file\n" * 20, r"not an ONNX model"),
    "empty file": (lambda _e: b"", r"not a usable ONNX model"),
    "two inputs": (lambda e: graph(e, extra_input=True), r"has 2 inputs; the contract is one"),
    "double input": (
        lambda e: graph(e, dtype=TensorProto.DOUBLE),
        r"input 'x' is tensor\(double\); the contract is tensor\(float\)",
    ),
    "five features": (lambda e: graph(e, features=5), r"input 'x' has shape \[N, 5\]"),
    "fixed batch": (lambda e: graph(e, batch=1), r"input 'x' has shape \[1, 4\].*dynamic N"),
    "two classes": (lambda e: graph(e, classes=2), r"output 'proba' has shape \[N, 2\]"),
    "transposed output": (
        lambda e: graph(e, transposed=True),
        r"answered 10016 rows with shape \[3, 10016\]; the contract is \[10016, 3\]",
    ),
    "unknown operator": (
        lambda e: graph(e, operator="Frobnicate"),
        r"not a usable ONNX model: .*No Op registered for Frobnicate",
    ),
    "logits, not probabilities": (
        lambda e: graph(e, softmax=False),
        r"probabilities outside \[0, 1\]|do not sum to 1",
    ),
    "ZipMap output": (zipmap_export, r"no single float output of probabilities.*without a ZipMap"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_model_outside_the_contract_is_refused_and_nothing_is_written(
    registry: Path, tmp_path: Path, foreign_estimator: LogisticRegression, case: str
) -> None:
    make, reason = REFUSED[case]
    source = tmp_path / "model.onnx"
    source.write_bytes(make(foreign_estimator))
    before = registry_state(registry)
    with pytest.raises(ModelError, match=reason) as refused:
        import_model(registry, source, FOREIGN)
    assert "\n" not in str(refused.value)
    assert registry_state(registry) == before


def test_an_imported_model_is_checked_and_recorded(
    registry: Path, tmp_path: Path, foreign_estimator: LogisticRegression
) -> None:
    source = tmp_path / "foreign.onnx"
    source.write_bytes(graph(foreign_estimator))
    manifest = import_model(registry, source, FOREIGN)
    assert manifest == read_manifest(registry, FOREIGN)
    assert (registry / FOREIGN / "model.onnx").read_bytes() == source.read_bytes()
    assert manifest.algorithm == "imported"
    assert manifest.metrics == {}
    assert manifest.opset == {"ai.onnx": 21}
    assert (manifest.input_name, manifest.output_name) == ("x", "proba")
    assert manifest.parity["reference"] is None
    assert manifest.parity["random_rows"] >= 10_000
    assert manifest.parity["max_row_sum_error"] <= manifest.parity["tolerance"]
    assert "no reference model" in manifest.parity["checked"]
    assert manifest.libraries["producer"] == "hand-written 1"
    assert list_versions(registry)[-1].version == FOREIGN, "the newest version"
    with pytest.raises(ModelError, match="already exists"):
        import_model(registry, source, FOREIGN)


def test_an_imported_model_serves_after_activation(
    make_settings: Callable[..., Settings],
    registry: Path,
    tmp_path: Path,
    foreign_estimator: LogisticRegression,
) -> None:
    source = tmp_path / "foreign.onnx"
    source.write_bytes(graph(foreign_estimator))
    import_model(registry, source, FOREIGN)
    app = create_app(make_settings(model_dir=registry, model_version="v2-logreg"))
    with TestClient(app, raise_server_exceptions=False) as client:
        customer = new_customer(client)
        admin = bearer(customer.token)
        listing = client.get("/v1/admin/models", headers=admin).json()
        assert listing["active"] == "v2-logreg"
        imported = next(v for v in listing["versions"] if v["version"] == FOREIGN)
        assert imported["algorithm"] == "imported"
        activated = client.post(f"/v1/admin/models/{FOREIGN}/activate", headers=admin)
        assert activated.status_code == 200, activated.text
        assert activated.json()["active"] == FOREIGN
        response = client.post(
            "/v1/predict/batch", json={"items": list(SAMPLES.values())}, headers=customer.headers
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == FOREIGN
        assert [p["species"] for p in body["predictions"]] == list(SAMPLES)
        rows = np.array([list(sample.values()) for sample in SAMPLES.values()])
        served = np.array([list(p["probabilities"].values()) for p in body["predictions"]])
        np.testing.assert_allclose(served, foreign_estimator.predict_proba(rows), atol=1e-5)


def import_command(registry: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", "models", "import", *args],
        env={**env, "TENANTSERVE_MODEL_DIR": str(registry)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_command_says_in_one_line_what_is_wrong(
    registry: Path, tmp_path: Path, foreign_estimator: LogisticRegression
) -> None:
    wrong = tmp_path / "wrong.onnx"
    wrong.write_bytes(graph(foreign_estimator, features=5))
    before = registry_state(registry)
    refused = import_command(registry, tmp_path, str(wrong), "--version", FOREIGN)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.strip().startswith("tenantserve: input 'x' has shape [N, 5]")
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    missing = import_command(registry, tmp_path, str(tmp_path / "absent.onnx"), "--version", "v8")
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    assert registry_state(registry) == before

    good = tmp_path / "good.onnx"
    good.write_bytes(graph(foreign_estimator))
    done = import_command(registry, tmp_path, str(good), "--version", FOREIGN)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["version"] == FOREIGN and printed["algorithm"] == "imported"
    assert printed["sha256"] == read_manifest(registry, FOREIGN).sha256
    assert onnx.load_model_from_string((registry / FOREIGN / "model.onnx").read_bytes()).graph
