"""Usage records: made durable in the worker's journal, then written behind in batches.

A request never waits for the database. With `durability="journal"` (the default) its record
is written to the journal (`tenants.usage.journal`) and its answer waits for the group's
fsync, so no answer leaves whose record a crash, a kill or a power loss could lose; with
`"written"` the answer waits only for the write (the record survives the worker's crash or
SIGKILL, and is fsync'd behind); with `"write-behind"` the record only joins the in-memory
queue, and a crash loses what was queued. A background task writes up to `max_rows` queued
records at a time, at least every `interval`. A record leaves
the queue only after its write committed; the write skips ids already present, so a flush
retried after a lost connection — or a journal replayed after a crash — cannot write a record
twice. While the database is away the queue grows; at `max_queue` customers get 503 rather
than unrecorded service. On shutdown the queue is written out; whatever the database still
refuses stays in (write-behind: goes to) the journal, which the next start replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable
from pathlib import Path
from typing import Literal

import structlog
from sqlalchemy import Engine

from tenants.usage.journal import UsageJournal
from tenants.usage.records import UsageEntry
from tenants.usage.writes import WRITE_ERRORS, UsageWriter

log = structlog.get_logger("tenantserve.usage")
_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


class UsageRecorder:
    def __init__(
        self,
        engine: Engine,
        *,
        interval_s: float,
        max_rows: int,
        max_queue: int,
        journal_dir: Path,
        durability: Literal["journal", "written", "write-behind"] = "journal",
    ) -> None:
        self._writer = UsageWriter(engine)
        self._interval = interval_s
        self._max_rows = max_rows
        self._max_queue = max_queue
        self._queue: deque[UsageEntry] = deque()
        self._journal = UsageJournal(
            journal_dir, self._enqueue, sync_before_answer=durability == "journal"
        )
        self._journaled = durability != "write-behind"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        # One flush at a time: the flusher and `written_through` both pop what they wrote.
        self._flushing = asyncio.Lock()
        self._written = 0
        """Records committed since start: with the queue's length, where any record stands."""

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def is_full(self) -> bool:
        return len(self._queue) >= self._max_queue

    def pending_items(self, tenant_id: str) -> int:
        """Predictions of `tenant_id` not yet written (quota seeding counts them too)."""
        return sum(entry.items for entry in self._queue if entry.tenant_id == tenant_id)

    async def written_through(self) -> bool:
        """Wait until every record queued before this call is committed; False if the database
        refused. What makes a customer's usage read see its own answers: each was queued before
        it was sent (the journal's group commit enqueues, then releases the answer)."""
        target = self._written + len(self._queue)
        while self._written < target:
            async with self._flushing:
                if self._written < target and not await self._flush_once():
                    return False
        return True

    def add(self, entry: UsageEntry) -> Awaitable[None] | None:
        """Record `entry`; with a journal, an awaitable done once a crash cannot lose it."""
        if not self._journaled:
            self._enqueue([entry])
            return None
        return self._journal.append(entry)

    def add_unjournaled(self, entry: UsageEntry) -> None:
        """Queue `entry` for the database without the journal (for when the journal fails)."""
        self._enqueue([entry])

    def _enqueue(self, entries: list[UsageEntry]) -> None:
        self._queue.extend(entries)
        if len(self._queue) >= self._max_rows:
            self._wake.set()

    def start(self) -> None:
        # The journal is claimed and replayed even in write-behind mode: a shutdown that the
        # database would not wait for leaves its records there.
        self._queue.extend(self._journal.claim_orphans())
        if self._journaled:
            self._journal.open()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-flusher")

    async def _run(self) -> None:
        while True:
            # Not `asyncio.wait_for`: on Python 3.11 it can lose the cancellation `close` sends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            while True:
                async with self._flushing:
                    if not self._queue:
                        break
                    flushed = await self._flush_once()
                if not flushed:
                    await asyncio.sleep(_RETRY_BACKOFF_S[min(self._failures, 3)])
                    break

    async def _flush_once(self) -> bool:
        batch = [self._queue[i] for i in range(min(self._max_rows, len(self._queue)))]
        try:
            await asyncio.to_thread(self._writer.write, batch)
        except WRITE_ERRORS as exc:
            if self._failures == 0:
                log.warning("usage_write_failed", error=type(exc).__name__, queued=len(self._queue))
            self._failures += 1
            return False
        for _ in batch:
            self._queue.popleft()
        self._written += len(batch)
        self._journal.committed(len(batch))
        if self._failures:
            log.warning("usage_write_recovered", failed_attempts=self._failures)
            self._failures = 0
        return True

    async def close(self, *, timeout_s: float = 20.0) -> None:
        """Write out every queued record; leave in the journal what the database will not
        take in time."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._journal.drain()
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline:
            async with self._flushing:
                flushed = await self._flush_once()
            if not flushed:
                await asyncio.sleep(0.5)
        if self._queue and not self._journaled:
            self._journal.dump(list(self._queue))
            self._journal.committed(len(self._queue))  # replayed segments: now in the dump
        self._journal.close()
