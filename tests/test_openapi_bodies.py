"""The OpenAPI document's request bodies and the server agree: what the schema accepts is
answered (200), what it refuses is a 422, for every value at and around each bound."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from service.config import Settings
from service.main import create_app
from tests.conftest import FEATURES, new_customer

SERVER_CAP = 3  # small, so that the over-cap bodies stay small
NAMES = list(FEATURES)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def schema_accepts(schema: dict[str, Any], body: bytes) -> bool:
    """The schema's verdict; a body that is not JSON (NaN, Infinity, …) satisfies no schema."""
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except ValueError:
        return False
    return bool(Draft202012Validator(schema).is_valid(document))


def raw(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=True).encode()


VALUES: list[Any] = [
    30, 30.0, 29.999999, 30.000001, 31, 1e-9, 5e-324, 0, 0.0, -0.0, -1, 10**30, 1e308,
    True, False, None, "5.1", [5.1], {"cm": 5.1}, math.nan, math.inf, -math.inf,
]  # fmt: skip


def single_bodies() -> Iterator[tuple[str, bytes]]:
    for name in NAMES:
        for value in VALUES:
            yield f"{name}={value!r}", raw({**FEATURES, name: value})
    yield "extra field", raw({**FEATURES, "colour": "blue"})
    yield "missing field", raw({k: v for k, v in FEATURES.items() if k != "petal_width"})
    yield "1e400", raw({**FEATURES, "sepal_length": 1}).replace(b": 1,", b": 1e400,", 1)
    yield "empty", b""
    yield "list", raw([FEATURES])
    yield "null", b"null"
    yield "number", b"5.1"
    yield "object", b"{}"
    yield "truncated", raw(FEATURES)[:-1]


def batch_bodies() -> Iterator[tuple[str, bytes]]:
    for size in range(SERVER_CAP + 2):
        yield f"{size} items", raw({"items": [FEATURES] * size})
    for value in (30, 30.000001, 0, True, "1", math.nan, None):
        spoiled = {**FEATURES, "sepal_width": value}
        yield f"one item with {value!r}", raw({"items": [FEATURES, spoiled]})
    yield "extra field in an item", raw({"items": [{**FEATURES, "colour": "blue"}]})
    yield "extra top-level field", raw({"items": [FEATURES], "mode": "fast"})
    yield "item not an object", raw({"items": [FEATURES, 5.1]})
    yield "items an object", raw({"items": FEATURES})
    yield "no items", b"{}"
    yield "a list body", raw([FEATURES])


def body_schema(client: TestClient, path: str) -> dict[str, Any]:
    document = client.get("/openapi.json").json()
    schema: dict[str, Any] = document["paths"][path]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    assert "$ref" not in json.dumps(schema), "a body schema must resolve on its own"
    return schema


@pytest.mark.parametrize(
    ("path", "bodies"), [("/v1/predict", single_bodies), ("/v1/predict/batch", batch_bodies)]
)
def test_the_schema_and_the_server_agree(
    make_settings: Callable[..., Settings],
    path: str,
    bodies: Callable[[], Iterator[tuple[str, bytes]]],
) -> None:
    with TestClient(
        create_app(make_settings(max_batch_size=SERVER_CAP)), raise_server_exceptions=False
    ) as client:
        schema = body_schema(client, path)
        headers = {
            **new_customer(client, rate_limit="100000/minute").headers,
            "Content-Type": "application/json",
        }
        disagreements = []
        for case, body in bodies():
            expected = 200 if schema_accepts(schema, body) else 422
            status = client.post(path, content=body, headers=headers).status_code
            if status != expected:
                disagreements.append((case, expected, status))
        assert not disagreements


def test_the_batch_schema_states_the_server_cap(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(max_batch_size=SERVER_CAP))) as client:
        items = body_schema(client, "/v1/predict/batch")["properties"]["items"]
        assert (items["minItems"], items["maxItems"]) == (1, SERVER_CAP)
