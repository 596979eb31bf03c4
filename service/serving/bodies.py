"""Request bodies of the predict routes → one float array, validated by their pydantic schemas.

pydantic's errors become the contract's 422 `errors: [{loc, msg}]`, located from `"body"`.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import numpy as np
from pydantic import ValidationError

from service.serving.schemas import FEATURE_NAMES, FEATURES_ADAPTER, BatchRequest, Features
from tenants.errors import ValidationFailed


def _refusal(exc: ValidationError) -> ValidationFailed:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    return ValidationFailed(
        [{"loc": ["body", *error["loc"]], "msg": error["msg"]} for error in errors]
    )


def _array(rows: Iterable[Features], count: int) -> np.ndarray:
    # A validated row's values come in the schema's field order, whatever the body's order.
    values = chain.from_iterable(row.values() for row in rows)
    return np.fromiter(values, np.float64, count=count * len(FEATURE_NAMES)).reshape(count, -1)


def single_rows(body: bytes) -> np.ndarray:
    """`{"sepal_length": …, …}` → an array of one row."""
    try:
        row = FEATURES_ADAPTER.validate_json(body)
    except ValidationError as exc:
        raise _refusal(exc) from None
    return np.array((tuple(row.values()),), np.float64)  # ~1 µs less than `_array` for one


def batch_rows(body: bytes, model: type[BatchRequest], *, cap: int) -> np.ndarray:
    """`{"items": [...]}` → an array; `model` holds the server's cap, `cap` the tenant's too."""
    try:
        items = model.model_validate_json(body).items
    except ValidationError as exc:
        raise _refusal(exc) from None
    if len(items) > cap:
        # In pydantic's own words for its `max_length`, so both caps read alike.
        message = f"List should have at most {cap} items after validation, not {len(items)}"
        raise ValidationFailed([{"loc": ["body", "items"], "msg": message}])
    return _array(items, len(items))
