"""The Open Inference Protocol, driven by a real OIP client (tritonclient.http) over HTTP.

One real server for the module; each test gets its own tenant and key. What a Triton or
KServe user sees: metadata, readiness, inference (FP32, FP64, both outputs or one, batches),
errors as the client's exception carrying our message, and the same gate and metering as
`/v1/predict`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import (
    FEATURES,
    Customer,
    LiveServer,
    bearer,
    live_server,
    new_customer,
    wait_for,
)
from tests.test_usage import records_once_flushed

pytestmark = pytest.mark.slow
IRIS = np.array(
    [[5.1, 3.5, 1.4, 0.2], [6.0, 2.9, 4.5, 1.5], [6.7, 3.0, 5.2, 2.3]], dtype=np.float64
)
SPECIES = [0, 1, 2]


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("oip")
    env = {
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{directory / 'tenantserve.db'}",
        "TENANTSERVE_MODEL_DIR": str(model_dir),
    }
    with live_server(env, directory / "server.log") as running:
        yield running


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def customer(http: httpx.Client) -> Customer:
    return new_customer(http)


@pytest.fixture
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    oip = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield oip
    oip.close()


def tensor(rows: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    dtype = np.float32 if datatype == "FP32" else np.float64
    given = triton.InferInput("input", list(rows.shape), datatype)
    given.set_data_from_numpy(rows.astype(dtype), binary_data=False)
    return given


def outputs(*names: str) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=False) for name in names]


def test_server_health_and_metadata_are_public(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata()["name"] == "tenantserve"


def test_model_metadata_and_readiness(
    client: triton.InferenceServerClient, customer: Customer
) -> None:
    metadata = client.get_model_metadata("iris", headers=customer.headers)
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert {(o["name"], o["datatype"], tuple(o["shape"])) for o in metadata["outputs"]} == {
        ("predict", "INT64", (-1,)),
        ("predict_proba", "FP64", (-1, 3)),
    }
    [own] = metadata["versions"]
    assert client.is_model_ready("iris", headers=customer.headers)
    assert client.is_model_ready("iris", own, headers=customer.headers)


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_inference_gives_the_species(
    client: triton.InferenceServerClient, customer: Customer, datatype: str
) -> None:
    result = client.infer(
        "iris", [tensor(IRIS, datatype)], outputs=outputs("predict", "predict_proba"),
        request_id="req-7", headers=customer.headers,
    )  # fmt: skip
    assert result.as_numpy("predict").tolist() == SPECIES
    proba = result.as_numpy("predict_proba")
    assert proba.shape == (3, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    answer = result.get_response()
    assert answer["id"] == "req-7"
    assert answer["model_name"] == "iris" and answer["model_version"]


def test_one_chosen_output_and_all_by_default(
    client: triton.InferenceServerClient, customer: Customer
) -> None:
    chosen = client.infer(
        "iris", [tensor(IRIS)], outputs=outputs("predict"), headers=customer.headers
    )
    assert [o["name"] for o in chosen.get_response()["outputs"]] == ["predict"]
    every = client.infer("iris", [tensor(IRIS)], headers=customer.headers)
    assert {o["name"] for o in every.get_response()["outputs"]} == {"predict", "predict_proba"}


def test_a_batch_of_100_matches_v1_and_is_metered_as_100(
    client: triton.InferenceServerClient, customer: Customer, http: httpx.Client
) -> None:
    rows = np.random.default_rng(0).uniform(0.1, 8.0, size=(100, 4))
    result = client.infer(
        "iris", [tensor(rows, "FP64")], outputs=outputs("predict", "predict_proba"),
        headers=customer.headers,
    )  # fmt: skip
    items = [dict(zip(FEATURES, row, strict=True)) for row in rows.tolist()]
    v1 = http.post("/v1/predict/batch", json={"items": items}, headers=customer.headers).json()
    assert result.as_numpy("predict").tolist() == [p["prediction"] for p in v1["predictions"]]
    np.testing.assert_allclose(
        result.as_numpy("predict_proba"),
        [list(p["probabilities"].values()) for p in v1["predictions"]],
        atol=1e-12,
    )
    # Written behind, perhaps by another worker than this client's: both records, once written.
    records = records_once_flushed(http, customer.token, 2, tenant_id=customer.tenant["id"])
    by_path = {record["path"]: record for record in records}
    assert by_path["/v2/models/iris/infer"]["items"] == 100
    assert by_path["/v2/models/iris/infer"]["status_code"] == 200


def failure(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value


def test_errors_surface_as_the_clients_exception_with_our_message(
    client: triton.InferenceServerClient, customer: Customer
) -> None:
    key = customer.headers
    wrong_shape = triton.InferInput("input", [3, 3], "FP32")
    wrong_shape.set_data_from_numpy(IRIS[:, :3].astype(np.float32), binary_data=False)
    error = failure(lambda: client.infer("iris", [wrong_shape], headers=key))
    assert error.status() == "422" and "shape must be [N, 4]" in error.message()

    ints = triton.InferInput("input", [3, 4], "INT32")
    ints.set_data_from_numpy(IRIS.astype(np.int32), binary_data=False)
    error = failure(lambda: client.infer("iris", [ints], headers=key))
    assert error.status() == "422" and "datatype" in error.message()

    out_of_bounds = IRIS.copy()
    out_of_bounds[1, 2] = 31.0
    error = failure(lambda: client.infer("iris", [tensor(out_of_bounds)], headers=key))
    assert error.status() == "422" and "less than or equal to 30" in error.message()

    not_a_number = IRIS.copy()
    not_a_number[0, 0] = np.nan
    error = failure(lambda: client.infer("iris", [tensor(not_a_number)], headers=key))
    assert error.status() == "422"

    error = failure(lambda: client.infer("roses", [tensor(IRIS)], headers=key))
    assert error.status() == "404" and "roses" in error.message()
    error = failure(lambda: client.get_model_metadata("iris", "v9-none", headers=key))
    assert error.status() == "403"  # not the tenant's version, and it may not choose


def test_without_a_key_every_model_call_is_401(
    client: triton.InferenceServerClient, customer: Customer
) -> None:
    for call in (
        lambda: client.get_model_metadata("iris"),
        lambda: client.infer("iris", [tensor(IRIS)]),
        lambda: client.infer("iris", [tensor(IRIS)], headers={"X-API-Key": "tsk_invented"}),
    ):
        assert failure(call).status() == "401"
    assert not client.is_model_ready("iris")


def test_a_version_is_chosen_only_when_the_tenant_may(
    client: triton.InferenceServerClient, customer: Customer, http: httpx.Client
) -> None:
    others = client.get_model_metadata("iris", headers=customer.headers)["versions"]
    own = others[0]
    other = "v1-forest" if own != "v1-forest" else "v2-logreg"
    error = failure(
        lambda: client.infer("iris", [tensor(IRIS)], model_version=other, headers=customer.headers)
    )
    assert error.status() == "403" and own in error.message()

    allowed = http.patch(
        f"/v1/admin/tenants/{customer.tenant['id']}", json={"allow_version_choice": True},
        headers=bearer(customer.token),
    )  # fmt: skip
    assert allowed.status_code == 200, allowed.text

    def chosen() -> str:
        result = client.infer("iris", [tensor(IRIS)], model_version=other, headers=customer.headers)
        return str(result.get_response()["model_version"])

    wait_for(lambda: _quietly(chosen) == other, within=1.0)
    metadata = client.get_model_metadata("iris", headers=customer.headers)
    assert set(metadata["versions"]) == {"v1-forest", "v2-logreg"}
    error = failure(
        lambda: client.infer("iris", [tensor(IRIS)], model_version="v9", headers=customer.headers)
    )
    assert error.status() == "404"


def _quietly(call: Any) -> Any:
    try:
        return call()
    except InferenceServerException:
        return None
