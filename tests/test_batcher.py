"""Micro-batching changes when rows are computed, never what comes back or who computed it."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.serving.batcher import INLINE_BUDGET_S, INLINE_MAX_ROWS, MicroBatcher
from service.serving.runtime import LoadedModel, load_model

VERSIONS = ("v1-forest", "v2-logreg")
POISON = 13.13  # a valid measurement that the fussy model below refuses to compute
Outcome = tuple[LoadedModel, np.ndarray] | BaseException


@pytest.fixture(scope="module")
def models(model_dir: Path) -> dict[str, LoadedModel]:
    return {version: load_model(model_dir, version) for version in VERSIONS}


def rows_of(sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.1, 30.0, size=(size, 4)) for size in sizes]


def predict_concurrently(
    current: Callable[[], LoadedModel],
    parts: Sequence[np.ndarray],
    *,
    enabled: bool,
    max_rows: int = 2048,
    max_wait_us: int = 0,
    arrivals: Sequence[int] = (),
) -> list[Outcome]:
    """One request per part, all in flight at once; `arrivals[i]` loop turns before request i."""
    batcher = MicroBatcher(enabled=enabled, max_rows=max_rows, max_wait_us=max_wait_us)

    async def request(rows: np.ndarray, delay: int) -> tuple[LoadedModel, np.ndarray]:
        for _ in range(delay):
            await asyncio.sleep(0)
        model = current()
        return model, await batcher.predict(model, rows)

    async def all_requests() -> list[Outcome]:
        delays = itertools.chain(arrivals, itertools.repeat(0))
        calls = [request(rows, delay) for rows, delay in zip(parts, delays, strict=False)]
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        return asyncio.run(all_requests())
    finally:
        batcher.close()


def counting(model: LoadedModel, calls: list[int]) -> LoadedModel:
    """The same model, noting the row count of every call it gets."""

    def predict_proba(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return model.predict_proba(rows)

    return LoadedModel(model.manifest, predict_proba)


def fussy(model: LoadedModel) -> LoadedModel:
    """The same model, except that any call containing a POISON value fails."""

    def predict_proba(rows: np.ndarray) -> np.ndarray:
        if np.any(rows == POISON):
            raise ValueError("cannot compute a poisoned row")
        return model.predict_proba(rows)

    return LoadedModel(model.manifest, predict_proba)


def assert_identical(outcome: Outcome, expected: np.ndarray, model: LoadedModel) -> None:
    assert not isinstance(outcome, BaseException), repr(outcome)
    reported, proba = outcome
    assert reported.version == model.version
    assert proba.dtype == expected.dtype and proba.shape == expected.shape
    assert proba.tobytes() == expected.tobytes(), "batched answer differs from unbatched"


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 25), min_size=1, max_size=40),
    seed=st.integers(0, 2**32 - 1),
    max_rows=st.integers(1, 300),
    max_wait_us=st.sampled_from([0, 0, 200]),
    arrivals=st.lists(st.integers(0, 3), max_size=40),
)
def test_batched_answers_are_bit_identical_to_unbatched(
    models: dict[str, LoadedModel],
    version: str,
    sizes: list[int],
    seed: int,
    max_rows: int,
    max_wait_us: int,
    arrivals: list[int],
) -> None:
    model = models[version]
    parts = rows_of(sizes, seed)
    options: dict[str, Any] = {"max_rows": max_rows, "max_wait_us": max_wait_us}
    alone = predict_concurrently(lambda: model, parts, enabled=False, **options)
    calls: list[int] = []
    shared = counting(model, calls)
    options["arrivals"] = arrivals
    together = predict_concurrently(lambda: shared, parts, enabled=True, **options)
    for single, batched in zip(alone, together, strict=True):
        assert not isinstance(single, BaseException)
        assert_identical(batched, single[1], model)
    assert sum(calls) == sum(sizes), "every row computed exactly once"
    assert len(calls) <= len(parts)


def test_concurrent_requests_share_one_model_call(models: dict[str, LoadedModel]) -> None:
    calls: list[int] = []
    model = counting(models["v2-logreg"], calls)
    parts = rows_of([1] * 50, seed=1)
    outcomes = predict_concurrently(lambda: model, parts, enabled=True)
    assert calls == [50]
    for outcome, rows in zip(outcomes, parts, strict=True):
        assert_identical(outcome, models["v2-logreg"].predict_proba(rows), model)


def test_the_batch_cap_splits_calls(models: dict[str, LoadedModel]) -> None:
    calls: list[int] = []
    model = counting(models["v2-logreg"], calls)
    predict_concurrently(lambda: model, rows_of([3] * 10, seed=2), enabled=True, max_rows=7)
    assert calls == [6, 6, 6, 6, 6]  # whole requests only, never more than 7 rows


@pytest.mark.parametrize("max_rows", [2048, 7])
def test_one_failing_request_fails_alone(models: dict[str, LoadedModel], max_rows: int) -> None:
    model = fussy(models["v2-logreg"])
    parts = rows_of([2, 3, 1, 4, 2, 5, 1, 2], seed=4)
    parts[3][1, 2] = POISON
    outcomes = predict_concurrently(lambda: model, parts, enabled=True, max_rows=max_rows)
    failure = outcomes[3]
    assert isinstance(failure, ValueError)
    assert "poisoned" in str(failure)
    for index, (outcome, rows) in enumerate(zip(outcomes, parts, strict=True)):
        if index != 3:
            assert_identical(outcome, models["v2-logreg"].predict_proba(rows), model)


def test_a_request_that_goes_away_does_not_disturb_the_others(
    models: dict[str, LoadedModel],
) -> None:
    model = models["v1-forest"]
    parts = rows_of([2] * 6, seed=5)
    batcher = MicroBatcher(enabled=True, max_rows=2048, max_wait_us=0)

    async def request(rows: np.ndarray) -> Outcome:
        return model, await batcher.predict(model, rows)

    async def scenario() -> list[Outcome]:
        tasks = [asyncio.create_task(request(rows)) for rows in parts]
        await asyncio.sleep(0)  # every request is queued; the batch has not run yet
        tasks[2].cancel()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    try:
        outcomes = asyncio.run(scenario())
    finally:
        batcher.close()
    assert isinstance(outcomes[2], asyncio.CancelledError)
    for index, (outcome, rows) in enumerate(zip(outcomes, parts, strict=True)):
        if index != 2:
            assert_identical(outcome, model.predict_proba(rows), model)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_reported_version_is_the_one_that_computed(
    models: dict[str, LoadedModel], enabled: bool
) -> None:
    """The active version flips between every batch; each answer names its real author."""
    flips = itertools.cycle([models["v1-forest"], models["v2-logreg"]])
    parts = rows_of([1, 2, 3, 1, 1, 4, 2, 2, 1, 3, 1, 1], seed=6)
    outcomes = predict_concurrently(lambda: next(flips), parts, enabled=enabled, max_rows=4)
    reported = set()
    for outcome, rows in zip(outcomes, parts, strict=True):
        assert not isinstance(outcome, BaseException)
        model = outcome[0]
        assert_identical(outcome, model.predict_proba(rows), model)
        reported.add(model.version)
    assert reported == set(VERSIONS), "the switch should have happened between batches"


def test_a_batch_never_mixes_versions(models: dict[str, LoadedModel]) -> None:
    calls: dict[str, list[int]] = {"v1-forest": [], "v2-logreg": []}
    counted = {version: counting(model, calls[version]) for version, model in models.items()}
    parts = rows_of([1] * 40, seed=6)
    served = itertools.cycle(["v1-forest", "v2-logreg", "v2-logreg"])
    outcomes = predict_concurrently(lambda: counted[next(served)], parts, enabled=True)
    for outcome, rows in zip(outcomes, parts, strict=True):
        assert not isinstance(outcome, BaseException)
        model, _ = outcome
        assert_identical(outcome, models[model.version].predict_proba(rows), model)
    assert sum(calls["v1-forest"]) == 14 and sum(calls["v2-logreg"]) == 26
    assert len(calls["v1-forest"]) + len(calls["v2-logreg"]) <= 4, "each version batched"


def computed_where(model: LoadedModel, row_seconds: float, threads: list[int]) -> LoadedModel:
    """The same model, claiming `row_seconds` a row, noting the thread of every call."""

    def predict_proba(rows: np.ndarray) -> np.ndarray:
        threads.append(threading.get_ident())
        return model.predict_proba(rows)

    return LoadedModel(model.manifest, predict_proba, row_seconds)


@pytest.mark.parametrize(
    ("row_seconds", "rows", "on_the_loop"),
    [
        (math.inf, INLINE_MAX_ROWS, True),  # not measured, and small
        (math.inf, INLINE_MAX_ROWS + 1, False),
        (INLINE_BUDGET_S / 4000, 2000, True),  # within the budget however many rows
        (INLINE_BUDGET_S / 100, 200, False),  # twice the budget
    ],
)
def test_a_call_stays_on_the_event_loop_only_while_it_is_cheap(
    models: dict[str, LoadedModel], row_seconds: float, rows: int, on_the_loop: bool
) -> None:
    threads: list[int] = []
    model = computed_where(models["v2-logreg"], row_seconds, threads)
    parts = rows_of([rows], seed=7)
    (outcome,) = predict_concurrently(lambda: model, parts, enabled=True)
    assert_identical(outcome, models["v2-logreg"].predict_proba(parts[0]), model)
    assert len(threads) == 1
    assert (threads[0] == threading.get_ident()) == on_the_loop  # asyncio.run runs the loop here


def test_a_loaded_version_knows_what_a_row_costs(models: dict[str, LoadedModel]) -> None:
    for model in models.values():
        assert 0 < model.row_seconds < math.inf
