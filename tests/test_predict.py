"""Predictions as a customer sees them, for both model versions, on both databases."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from tests.conftest import FEATURES, admin_token, bearer, new_customer

# One textbook sample per species (Fisher's iris data).
SAMPLES = {
    "setosa": {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    "versicolor": {
        "sepal_length": 6.4,
        "sepal_width": 3.2,
        "petal_length": 4.5,
        "petal_width": 1.5,
    },
    "virginica": {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3},
}


@pytest.mark.parametrize("version", ["v1-forest", "v2-logreg"])
def test_each_version_predicts_the_right_species(client: TestClient, version: str) -> None:
    customer = new_customer(client)
    activated = client.post(f"/v1/admin/models/{version}/activate", headers=bearer(customer.token))
    assert activated.status_code == 200, activated.text
    assert activated.json()["active"] == version
    for index, (species, features) in enumerate(SAMPLES.items()):
        response = client.post("/v1/predict", json=features, headers=customer.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["species"] == species
        assert body["prediction"] == index
        assert body["model_version"] == version
        assert math.isclose(sum(body["probabilities"].values()), 1.0, abs_tol=1e-9)
        assert set(body["probabilities"]) == set(SAMPLES)


def test_batch_answers_in_input_order(client: TestClient) -> None:
    customer = new_customer(client)
    order = ["virginica", "setosa", "versicolor", "setosa", "virginica"]
    response = client.post(
        "/v1/predict/batch",
        json={"items": [SAMPLES[name] for name in order]},
        headers=customer.headers,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["species"] for p in body["predictions"]] == order
    assert all(p["model_version"] == body["model_version"] for p in body["predictions"])


def test_a_single_answer_is_the_batch_answer_for_that_row(client: TestClient) -> None:
    """Both routes write their answers their own way: the same row must read the same."""
    customer = new_customer(client)
    rows = [*SAMPLES.values(), FEATURES, {**FEATURES, "petal_length": 2.45, "petal_width": 0.8}]
    batch = client.post("/v1/predict/batch", json={"items": rows}, headers=customer.headers)
    assert batch.status_code == 200, batch.text
    for row, expected in zip(rows, batch.json()["predictions"], strict=True):
        single = client.post("/v1/predict", json=row, headers=customer.headers)
        assert single.status_code == 200, single.text
        assert single.json() == expected
        assert list(single.json()["probabilities"]) == list(SAMPLES)  # in class order


def test_unknown_model_version_is_404(client: TestClient) -> None:
    token = admin_token(client)
    response = client.post("/v1/admin/models/v9-nope/activate", headers=bearer(token))
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    listing = client.get("/v1/admin/models", headers=bearer(token)).json()
    assert {v["version"] for v in listing["versions"]} == {"v1-forest", "v2-logreg"}
    assert all(len(v["sha256"]) == 64 for v in listing["versions"])


def test_prediction_needs_a_key(client: TestClient) -> None:
    response = client.post("/v1/predict", json=FEATURES)
    assert response.status_code == 401
    assert response.json()["code"] == "missing_credentials"
    assert "WWW-Authenticate" in response.headers
