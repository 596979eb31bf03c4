"""Usage records, queued in the worker and written behind in multi-row INSERTs.

A request never waits for the database: it appends to a deque (microseconds). A background
task writes up to `max_rows` records at a time, at least every `interval`. A record leaves the
queue only after its INSERT committed; the INSERT skips ids already present, so a flush retried
after a lost connection cannot write a record twice. While the database is away the queue
grows; at `max_queue` customers get 503 rather than unrecorded service. On shutdown the queue
is written out, and whatever the database still refuses goes to a spill file that the next
start loads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from pathlib import Path

import structlog
from sqlalchemy import Engine, Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from tenants.tables import UsageRecord
from tenants.usage.records import UsageEntry

log = structlog.get_logger("tenantserve.usage")
_TABLE = UsageRecord.__table__  # type: ignore[attr-defined]
_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


def _insert_ignoring_duplicates(engine: Engine, entries: list[UsageEntry]) -> None:
    # One statement, compiled once and cached; SQLAlchemy's "insertmanyvalues" sends the rows
    # as multi-row INSERTs. (`.values(rows)` would compile a new statement every flush.)
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement: Insert = dialect.insert(_TABLE).on_conflict_do_nothing(index_elements=["id"])
    with engine.begin() as connection:
        connection.execute(statement, [entry.as_row() for entry in entries])


class UsageRecorder:
    def __init__(
        self,
        engine: Engine,
        *,
        interval_s: float,
        max_rows: int,
        max_queue: int,
        spill_dir: Path,
    ) -> None:
        self._engine = engine
        self._interval = interval_s
        # SQLite allows 32,766 bound values a statement; a record binds 11.
        self._max_rows = min(max_rows, 2000)
        self._max_queue = max_queue
        self._spill_dir = spill_dir
        self._queue: deque[UsageEntry] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def is_full(self) -> bool:
        return len(self._queue) >= self._max_queue

    def pending_items(self, tenant_id: str) -> int:
        """Predictions of `tenant_id` not yet written (quota seeding counts them too)."""
        return sum(entry.items for entry in self._queue if entry.tenant_id == tenant_id)

    def add(self, entry: UsageEntry) -> None:
        self._queue.append(entry)
        if len(self._queue) >= self._max_rows:
            self._wake.set()

    def start(self) -> None:
        self._load_spills()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-flusher")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            self._wake.clear()
            while self._queue:
                if not await self._flush_once():
                    await asyncio.sleep(_RETRY_BACKOFF_S[min(self._failures, 3)])
                    break

    async def _flush_once(self) -> bool:
        batch = [self._queue[i] for i in range(min(self._max_rows, len(self._queue)))]
        try:
            await asyncio.to_thread(_insert_ignoring_duplicates, self._engine, batch)
        except (SQLAlchemyError, OSError) as exc:
            if self._failures == 0:
                log.warning("usage_write_failed", error=type(exc).__name__, queued=len(self._queue))
            self._failures += 1
            return False
        for _ in batch:
            self._queue.popleft()
        if self._failures:
            log.warning("usage_write_recovered", failed_attempts=self._failures)
            self._failures = 0
        return True

    async def close(self, *, timeout_s: float = 20.0) -> None:
        """Write out every queued record; spill what the database will not take in time."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline:
            if not await self._flush_once():
                await asyncio.sleep(0.5)
        if self._queue:
            self._spill()

    def _spill(self) -> None:
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"usage-spill-{os.getpid()}-{time.time_ns()}.jsonl"
        with path.open("w") as spill:
            for entry in self._queue:
                spill.write(json.dumps(entry.as_json()) + "\n")
        log.error("usage_spilled_to_disk", records=len(self._queue), file=str(path))
        self._queue.clear()

    def _load_spills(self) -> None:
        for path in sorted(self._spill_dir.glob("usage-spill-*.jsonl")):
            claimed = path.with_suffix(".loading")
            try:
                path.rename(claimed)  # only one worker takes each file
            except OSError:
                continue
            lines = claimed.read_text().splitlines()
            self._queue.extend(UsageEntry.from_json(json.loads(line)) for line in lines)
            claimed.unlink()
            log.info("usage_spill_loaded", records=len(lines), file=str(path))
