"""Micro-batching: concurrent predictions share one model call in the model thread.

While the model thread computes one batch, new requests gather in `_pending`; the next call
takes them all at once. At low load a request runs alone and at once (no timer to wait for);
under load the per-call overhead — the bulk of a small model's cost — is paid once per batch.
Each request names the model version that must compute it (its tenant's); a batch takes the
waiting requests of one version only, so a batch never mixes versions and every answer names
the version that really computed it.

NOTE: a cheap call runs inline, on the event loop. Handing it to the model thread costs ~130 µs
of CPU (a wake-up and a callback each way), more than ONNX Runtime takes for ~2,000 rows of the
logistic regression or ~50 of the forest (`perf.model_figures`). So a call runs inline when its
model's cost, measured as the version loads, says it takes at most `INLINE_BUDGET_S`; a longer
one goes to the thread, which ONNX Runtime lets run without the GIL while the loop serves
other requests. At 32 connections a worker, the micro-batches of single predictions were
mostly over 16 rows and each paid the hand-off: on the loop, 5% less CPU a request; batch
requests of the logistic regression 6% less (perf/README.md, "Session 12").
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.serving.runtime import LoadedModel
from tenants.background import background_threads

INLINE_MAX_ROWS = 16
"""Calls of at most this many rows run on the event loop, whatever their model."""
INLINE_BUDGET_S = 100e-6
"""Larger calls run there too when their model's measured cost puts them within this."""


@dataclass(slots=True)
class _Request:
    model: LoadedModel
    rows: np.ndarray
    future: asyncio.Future[np.ndarray] = field(repr=False)


class MicroBatcher:
    def __init__(
        self,
        *,
        enabled: bool,
        max_rows: int,
        max_wait_us: int,
        inline_max_rows: int = INLINE_MAX_ROWS,
        inline_budget_s: float = INLINE_BUDGET_S,
    ) -> None:
        self._enabled = enabled
        self._inline_max_rows = inline_max_rows
        self._inline_budget_s = inline_budget_s
        self._max_rows = max_rows
        self._max_wait = max_wait_us / 1_000_000
        # One thread: a worker is sized for one core; more would only contend with the loop.
        self._executor = background_threads("model", max_workers=1)
        self._pending: list[_Request] = []
        self._pending_rows = 0
        self._draining = False
        self._drainer: asyncio.Task[None] | None = None

    async def predict(self, model: LoadedModel, rows: np.ndarray) -> np.ndarray:
        """`model`'s probabilities for `rows`."""
        loop = asyncio.get_running_loop()
        if not self._enabled:
            return (await self._compute(model, [rows]))[0]
        request = _Request(model, rows, loop.create_future())
        self._pending.append(request)
        self._pending_rows += len(rows)
        if not self._draining:
            self._draining = True
            # Keep a reference: the loop holds tasks only weakly.
            self._drainer = loop.create_task(self._drain())
        return await request.future

    async def _compute(self, model: LoadedModel, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One model call for all parts: inline when cheap, else in the model thread."""
        rows = sum(len(part) for part in parts)
        if rows <= self._inline_max_rows or rows * model.row_seconds <= self._inline_budget_s:
            return _predict_many(model, parts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _predict_many, model, parts)

    async def _drain(self) -> None:
        try:
            while self._pending:
                if self._max_wait and self._pending_rows < self._max_rows:
                    await asyncio.sleep(self._max_wait)
                batch = self._take_batch()
                model = batch[0].model
                try:
                    proba = await self._compute(model, [r.rows for r in batch])
                except Exception as exc:
                    await self._retry_one_by_one(model, batch, exc)
                    continue
                for request, result in zip(batch, proba, strict=True):
                    if not request.future.done():  # the client may have gone away
                        request.future.set_result(result)
        finally:
            self._draining = False

    def _take_batch(self) -> list[_Request]:
        """The oldest request and, in order, the others of its version while they fit."""
        version = self._pending[0].model.version
        batch: list[_Request] = []
        waiting: list[_Request] = []
        rows = 0
        for request in self._pending:
            fits = not batch or rows + len(request.rows) <= self._max_rows
            if request.model.version == version and fits:
                batch.append(request)
                rows += len(request.rows)
            else:
                waiting.append(request)
        self._pending = waiting
        self._pending_rows -= rows
        return batch

    async def _retry_one_by_one(
        self, model: LoadedModel, batch: list[_Request], error: Exception
    ) -> None:
        """A failed shared call is retried per request, so one bad request fails alone."""
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        for request in batch:
            try:
                (proba,) = await self._compute(model, [request.rows])
            except Exception as exc:
                if not request.future.done():
                    request.future.set_exception(exc)
            else:
                if not request.future.done():
                    request.future.set_result(proba)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _predict_many(model: LoadedModel, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One call for all parts, split back in order."""
    if len(parts) == 1:
        return [model.predict_proba(parts[0])]
    proba = model.predict_proba(np.concatenate(parts))
    # Sliced by hand: `np.split` took ~20 µs for 20 one-row parts, slicing ~3.
    answers, start = [], 0
    for part in parts:
        answers.append(proba[start : start + len(part)])
        start += len(part)
    return answers
