"""Every invalid input the contract names is a 422 problem+json that says what is wrong, where.

The table-driven cases share one app on its own SQLite file: validation never touches the
database, and a fresh app per case would cost seconds each. The cap tests and the property
test take the `client` fixture, so they run on both databases.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.main import create_app
from tests.conftest import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    FEATURES,
    admin_token,
    create_tenant,
    new_customer,
)

Loc = list[str | int]
ROOMY_LIMIT = "100000/minute"  # these tests are about validation, not about rate limits


def raw(payload: Any) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity go out as bare tokens."""
    return json.dumps(payload, allow_nan=True).encode()


def features(**changes: Any) -> dict[str, Any]:
    return {**FEATURES, **changes}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in FEATURES.items() if k != name}


def post(client: TestClient, path: str, body: bytes, headers: dict[str, str]) -> Any:
    return client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})


def assert_invalid(response: Any, loc: Loc) -> list[dict[str, Any]]:
    """A 422 in the contract's shape whose `errors` point at `loc`."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "validation_error"
    assert body["status"] == 422
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["title"] and body["detail"] and body["type"]
    errors: list[dict[str, Any]] = body["errors"]
    assert errors, "a 422 must say what is wrong"
    for error in errors:
        assert set(error) == {"loc", "msg"}
        assert isinstance(error["msg"], str) and error["msg"]
    assert loc in [error["loc"] for error in errors], errors
    return errors


def assert_predicted(response: Any, rows: int | None = None) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    predictions = [body] if rows is None else body["predictions"]
    assert len(predictions) == (rows or 1)
    for prediction in predictions:
        assert math.isclose(sum(prediction["probabilities"].values()), 1.0, abs_tol=1e-9)


@pytest.fixture(scope="module")
def api(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    directory = tmp_path_factory.mktemp("validation")
    app = create_app(
        Settings(
            _env_file=None,
            env="development",
            database_url=f"sqlite:///{directory / 'tenantserve.db'}",
            model_dir=model_dir,
            usage_journal_dir=directory / "journal",
            bootstrap_admin_username=ADMIN_USERNAME,
            bootstrap_admin_password=ADMIN_PASSWORD,
        )
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def key(api: TestClient) -> dict[str, str]:
    return new_customer(api, rate_limit=ROOMY_LIMIT).headers


SINGLE_CASES: dict[str, tuple[bytes, Loc]] = {
    "missing field": (raw(without("petal_width")), ["body", "petal_width"]),
    "string value": (raw(features(sepal_length="5.1")), ["body", "sepal_length"]),
    "null value": (raw(features(sepal_width=None)), ["body", "sepal_width"]),
    "list value": (raw(features(sepal_width=[3.5])), ["body", "sepal_width"]),
    "zero": (raw(features(petal_length=0)), ["body", "petal_length"]),
    "float zero": (raw(features(petal_length=0.0)), ["body", "petal_length"]),
    "negative zero": (raw(features(petal_length=-0.0)), ["body", "petal_length"]),
    "negative": (raw(features(petal_width=-1.2)), ["body", "petal_width"]),
    "just over 30": (raw(features(sepal_length=30.000001)), ["body", "sepal_length"]),
    "31": (raw(features(sepal_length=31)), ["body", "sepal_length"]),
    "huge integer": (raw(features(sepal_length=10**30)), ["body", "sepal_length"]),
    "true": (raw(features(sepal_width=True)), ["body", "sepal_width"]),
    "false": (raw(features(sepal_width=False)), ["body", "sepal_width"]),
    # JSON has no NaN or Infinity; pydantic reads the bare tokens and names the field.
    "NaN": (raw(features(sepal_length=math.nan)), ["body", "sepal_length"]),
    "Infinity": (raw(features(sepal_length=math.inf)), ["body", "sepal_length"]),
    "-Infinity": (raw(features(sepal_length=-math.inf)), ["body", "sepal_length"]),
    "overflowing number": (b'{"sepal_length": 1e400}', ["body", "sepal_length"]),
    "extra field": (raw(features(colour="blue")), ["body", "colour"]),
    "malformed JSON": (raw(FEATURES)[:-1], ["body"]),
    "empty body": (b"", ["body"]),
    "not JSON at all": (b"sepal_length=5.1", ["body"]),
    "a list body": (raw(list(FEATURES.values())), ["body"]),
    "a string body": (raw("setosa"), ["body"]),
    "a number body": (b"5.1", ["body"]),
    "a null body": (b"null", ["body"]),
    "an empty object": (b"{}", ["body", "sepal_length"]),
}

BATCH_CASES: dict[str, tuple[bytes, Loc]] = {
    "empty batch": (raw({"items": []}), ["body", "items"]),
    "no items": (raw({}), ["body", "items"]),
    "items not a list": (raw({"items": FEATURES}), ["body", "items"]),
    "a list body": (raw([FEATURES]), ["body"]),
    "malformed JSON": (raw({"items": [FEATURES]})[:-2], ["body"]),
    "extra top-level field": (raw({"items": [FEATURES], "mode": "fast"}), ["body", "mode"]),
    "item not an object": (raw({"items": [FEATURES, 5.1]}), ["body", "items", 1]),
    "item a list": (raw({"items": [list(FEATURES.values())]}), ["body", "items", 0]),
    "item null": (raw({"items": [FEATURES, None]}), ["body", "items", 1]),
    "bad value in one item": (
        raw({"items": [FEATURES, FEATURES, features(petal_width=0)]}),
        ["body", "items", 2, "petal_width"],
    ),
    "missing field in one item": (
        raw({"items": [without("sepal_length"), FEATURES]}),
        ["body", "items", 0, "sepal_length"],
    ),
    "extra field in one item": (
        raw({"items": [FEATURES, features(colour="blue")]}),
        ["body", "items", 1, "colour"],
    ),
    "boolean in one item": (
        raw({"items": [features(petal_length=True)]}),
        ["body", "items", 0, "petal_length"],
    ),
    "NaN in one item": (
        raw({"items": [FEATURES, features(sepal_width=math.nan)]}),
        ["body", "items", 1, "sepal_width"],
    ),
}


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_invalid_single_is_422(api: TestClient, key: dict[str, str], case: str) -> None:
    body, loc = SINGLE_CASES[case]
    assert_invalid(post(api, "/v1/predict", body, key), loc)


@pytest.mark.parametrize("case", BATCH_CASES)
def test_invalid_batch_is_422(api: TestClient, key: dict[str, str], case: str) -> None:
    body, loc = BATCH_CASES[case]
    assert_invalid(post(api, "/v1/predict/batch", body, key), loc)


def test_every_wrong_field_is_named(api: TestClient, key: dict[str, str]) -> None:
    body = raw({"sepal_length": 0, "sepal_width": "wide", "petal_length": 31, "extra": 1})
    errors = assert_invalid(post(api, "/v1/predict", body, key), ["body", "sepal_length"])
    named = {error["loc"][-1] for error in errors}
    assert named == {"sepal_length", "sepal_width", "petal_length", "petal_width", "extra"}


def test_a_callers_request_id_is_echoed_in_the_422(api: TestClient, key: dict[str, str]) -> None:
    headers = {**key, "X-Request-ID": "validation-trace-1"}
    response = post(api, "/v1/predict", raw(features(petal_width=-1)), headers)
    assert_invalid(response, ["body", "petal_width"])
    assert response.json()["request_id"] == "validation-trace-1"


@pytest.mark.parametrize(
    "value", [30, 30.0, 29.999999, 1, 0.001, 1e-9, 5e-324], ids=lambda value: repr(value)
)
def test_bounds_are_inclusive_of_30_and_exclusive_of_0(
    api: TestClient, key: dict[str, str], value: float
) -> None:
    every_field = dict.fromkeys(FEATURES, value)
    assert_predicted(post(api, "/v1/predict", raw(every_field), key))
    batch = raw({"items": [every_field, FEATURES]})
    assert_predicted(post(api, "/v1/predict/batch", batch, key), rows=2)


def test_the_server_default_cap_is_1000(api: TestClient, key: dict[str, str]) -> None:
    """A tenant created without a cap gets the server's; 1000 pass, 1001 do not."""
    assert_predicted(post(api, "/v1/predict/batch", raw({"items": [FEATURES] * 1000}), key), 1000)
    over = post(api, "/v1/predict/batch", raw({"items": [FEATURES] * 1001}), key)
    assert_invalid(over, ["body", "items"])


def assert_cap(client: TestClient, headers: dict[str, str], cap: int) -> None:
    at_cap = post(client, "/v1/predict/batch", raw({"items": [FEATURES] * cap}), headers)
    assert_predicted(at_cap, rows=cap)
    over = post(client, "/v1/predict/batch", raw({"items": [FEATURES] * (cap + 1)}), headers)
    (error,) = assert_invalid(over, ["body", "items"])
    assert str(cap) in error["msg"]


def test_tenant_cap_below_the_server_cap(client: TestClient) -> None:
    token = admin_token(client)
    tenant = create_tenant(client, token, max_batch_size=3)
    assert_cap(client, new_customer(client, token, tenant=tenant).headers, cap=3)


def test_server_cap_below_the_tenant_cap(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(max_batch_size=2))
    with TestClient(app, raise_server_exceptions=False) as client:
        token = admin_token(client)
        tenant = create_tenant(client, token, max_batch_size=5)
        assert tenant["max_batch_size"] == 5
        assert_cap(client, new_customer(client, token, tenant=tenant).headers, cap=2)


# Property: inside the bounds always answers, outside always names the field.

valid_value = st.floats(min_value=0.0, max_value=30.0, exclude_min=True) | st.integers(1, 30)
invalid_value = (
    st.floats(max_value=0.0)
    | st.floats(min_value=30.0, exclude_min=True)
    | st.just(math.nan)
    | st.integers(max_value=0)
    | st.integers(min_value=31, max_value=10**20)
)
valid_features = st.fixed_dictionaries({name: valid_value for name in FEATURES})


@pytest.fixture
def roomy_key(client: TestClient) -> dict[str, str]:
    return new_customer(client, rate_limit=ROOMY_LIMIT).headers


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    row=valid_features,
    spoiled=st.sampled_from(list(FEATURES)),
    bad=invalid_value,
)
def test_in_bounds_answers_and_out_of_bounds_is_422(
    client: TestClient, roomy_key: dict[str, str], row: dict[str, float], spoiled: str, bad: float
) -> None:
    assert_predicted(post(client, "/v1/predict", raw(row), roomy_key))

    spoiled_row = {**row, spoiled: bad}
    response = post(client, "/v1/predict", raw(spoiled_row), roomy_key)
    assert_invalid(response, ["body", spoiled])
    batch = raw({"items": [row, spoiled_row]})
    response = post(client, "/v1/predict/batch", batch, roomy_key)
    assert_invalid(response, ["body", "items", 1, spoiled])
