"""The usage journal: records on local disk before their answers leave.

Each worker appends to its own segment file, one line a record: the CRC-32 of the JSON (8 hex
digits), a space, the JSON, over zeros written ahead (a reader stops at them as at a torn
tail). The event loop writes the records of each of its turns together, at the next turn: a
write into the kernel's page cache, a few microseconds, after which they outlive the worker's
crash or SIGKILL. A thread of the journal's own brings what was written to the disk with
`fsync`, one at a time, each covering every record written before it began (group commit), and
the next at once while there is more: the loop is told of each, but never waited for in
between. With `sync_before_answer` (durability `journal`) an answer waits for the fsync that
covers its record, so not even a power loss can take it; without it (`written`) the answer
leaves once its record is written, and the fsync follows within `SYNC_BEHIND_S`. The loop never
waits for the disk: a stalled fsync delays answers in `journal` mode only, and writing goes on.

A record joins the recorder's queue once it is as durable as the mode promises, in the order
written. Once a segment has grown past `recycle_bytes` and everything in it is committed to the
database (or it has grown past `segment_bytes`, say while the database is away), writing moves
to a fresh one that the thread made ahead; the thread deletes a segment once every record in it
is committed. So the loop itself never creates, truncates or deletes a file.

Every open segment is held under an exclusive `flock`, which dies with its process: at start,
a worker claims each segment nobody holds (left by a crash, a kill, or a shutdown the database
would not wait for) and replays it. Replaying is safe whenever it happens, because records
are inserted idempotently on their id. A line torn by a crash mid-write ends the file's
readable part; a line whose checksum or JSON is wrong is reported once and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import structlog

from tenants.background import background_threads, yield_to_the_loop
from tenants.usage.records import UsageEntry

log = structlog.get_logger("tenantserve.usage")
SEGMENT_GLOB = "usage-*.journal"
SYNC_BEHIND_S = 0.05
"""In `written` mode, the pause after each fsync: at most ~20 a second, however busy."""


def encode(entries: Iterable[UsageEntry]) -> bytes:
    """Journal lines for `entries`."""
    lines = []
    for entry in entries:
        data = orjson.dumps(entry)  # a dataclass: orjson writes its fields, in C
        lines.append(b"%08x %s\n" % (zlib.crc32(data), data))
    return b"".join(lines)


def decode(content: bytes, *, source: str) -> list[UsageEntry]:
    """The intact records of a segment: a torn tail is ignored, corrupt lines are skipped."""
    lines = content.split(b"\n")
    lines.pop()  # after the last newline: empty, or the torn remains of an unfinished write
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            checksum, data = line.split(b" ", 1)
            if int(checksum, 16) != zlib.crc32(data):
                raise ValueError("checksum mismatch")
            entries.append(UsageEntry.from_json(orjson.loads(data)))
        except (ValueError, TypeError, KeyError) as exc:
            log.error("usage_journal_entry_corrupt", file=source, line=number, error=str(exc))
    return entries


@dataclass(eq=False)
class Segment:
    """One journal file, held open under this process's lock."""

    path: Path
    fd: int
    size: int = 0
    uncommitted: int = 0
    """Records written here that the database has not committed yet (and, in `journal` mode,
    whose fsync has not failed)."""

    @classmethod
    def create(cls, directory: Path, *, zeroed: int = 0) -> Segment:
        """A new segment, its first `zeroed` bytes written as zeros where the disk has room.

        NOTE: an fsync of a file that grew must also commit its new size and blocks to the
        filesystem's journal; overwriting blocks already written needs only the data: ~35% less
        time and CPU an fsync here (perf/README.md, "Session 9"). A reader stops at the zeros
        as at any torn tail.
        """
        # Locked before it is visible under a name other workers claim.
        name = f"usage-{os.getpid()}-{time.time_ns()}.journal"
        hidden = directory / f".{name}"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            _write_all(fd, bytes(zeroed), 0)
            os.fdatasync(fd)
        except OSError:
            os.ftruncate(fd, 0)  # no room to spare: the segment grows as it is written
        os.rename(hidden, directory / name)
        _sync_directory(directory)
        return cls(directory / name, fd)

    @classmethod
    def claim(cls, path: Path) -> Segment | None:
        """The orphan at `path`, locked by this process; None when a live process holds it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != path.stat().st_ino:
                raise FileNotFoundError(path)  # replayed and deleted while we opened it
        except OSError:
            os.close(fd)
            return None
        return cls(path, fd, size=os.fstat(fd).st_size)

    def read(self) -> bytes:
        return os.pread(self.fd, self.size, 0)

    def write(self, data: bytes) -> None:
        """Append `data` whole, or raise (then whatever part was written is a torn tail)."""
        _write_all(self.fd, data, self.size)
        self.size += len(data)

    def sync(self) -> None:
        os.fdatasync(self.fd)  # the data, and the size where it grew: all a reader needs

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _sync_directory(directory: Path) -> None:
    """Make a new or renamed file's name durable too, not only its content."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_all(segments: Iterable[Segment]) -> None:
    for segment in segments:
        segment.sync()


@dataclass(eq=False)
class _Batch:
    """Records appended in one turn of the event loop, written together at the next."""

    entries: list[UsageEntry] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    """One a record, done once the batch is written (`written`) or synced (`journal`).

    NOTE: one each, not one shared and `asyncio.shield`ed: a cancelled request cancels only
    its own, and its answer resumes a turn of the loop sooner (a shield's outer future is done
    one turn after the inner; under load a turn is ~0.5 ms)."""

    def settle(self, error: OSError | None = None) -> None:
        for waiter in self.waiters:
            if waiter.done():  # its request was cancelled
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class UsageJournal:
    """Per-worker journal segments, synced in groups, and the orphans this worker replays."""

    def __init__(
        self,
        directory: Path,
        on_durable: Callable[[list[UsageEntry]], None],
        *,
        sync_before_answer: bool = True,
        segment_bytes: int = 4 << 20,
        recycle_bytes: int = 256 << 10,
    ) -> None:
        self._directory = directory
        self._on_durable = on_durable
        """Where records go once durable (the recorder's queue), in the order written."""
        self._sync_before_answer = sync_before_answer
        self._segment_bytes = segment_bytes
        self._recycle_bytes = recycle_bytes
        self._segments: deque[Segment] = deque()
        """Oldest first, in the order their records sit in the recorder's queue."""
        self._current: Segment | None = None
        self._spare: Future[Segment] | None = None
        self._batch: _Batch | None = None
        """This turn's records, written at the next."""
        # Shared with the sync thread, under `_lock`:
        self._lock = threading.Lock()
        self._wanted = threading.Condition(self._lock)
        self._dirty: set[Segment] = set()
        """Segments written since the last fsync began."""
        self._unsynced: list[tuple[Segment, _Batch]] = []
        """`journal` mode: the batches written since the last fsync began, answered by the next."""
        self._written_batches = 0
        self._sync_idle = False
        """The sync thread waits for something to sync (and only then needs waking)."""
        self._closing = False
        # On the loop only:
        self._synced_batches = 0
        """Of `_written_batches`, those the last fsync the loop has heard of covered."""
        self._caught_up: asyncio.Future[None] | None = None
        """`drain`'s wait for the next fsync."""
        self._syncer: threading.Thread | None = None
        # NOTE: its own thread, fsyncing back to back while there is more. Handing each fsync
        # to an executor made the loop start every next one, a turn of the loop later: under
        # load ~1 ms more a record waited (perf/README.md, "Session 9").
        self._syncing = threading.Lock()
        """Held by the sync thread over an fsync: a segment is never deleted in the middle."""
        # Segments are made and deleted here, in the order asked, without a copy of the context.
        self._thread = background_threads("usage-journal", max_workers=1)

    def claim_orphans(self) -> Iterator[UsageEntry]:
        """The records of every segment no live process holds; kept until they are committed."""
        self._directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self._directory.glob(SEGMENT_GLOB)):
            segment = Segment.claim(path)
            if segment is None:
                continue
            entries = decode(segment.read(), source=path.name)
            if not entries:
                segment.delete()
                continue
            segment.uncommitted = len(entries)
            self._segments.append(segment)
            log.info("usage_journal_replayed", records=len(entries), file=path.name)
            yield from entries

    def open(self) -> None:
        """A segment to write and a spare, made at start (the only time the caller waits)."""
        self._directory.mkdir(parents=True, exist_ok=True)
        self._current = Segment.create(self._directory, zeroed=self._zeroed)
        self._segments.append(self._current)
        self._spare = self._new_spare()
        loop = asyncio.get_running_loop()
        self._syncer = threading.Thread(
            target=self._sync_in_thread, args=(loop,), name="usage-sync", daemon=True
        )
        self._syncer.start()

    def append(self, entry: UsageEntry) -> asyncio.Future[None]:
        """A future done once `entry` is written (`written`) or on disk (`journal`); it raises
        the OSError of a write or fsync that failed."""
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            loop.call_soon(self._write_batch)  # one write a turn, however many requests
        waiter = loop.create_future()
        batch.entries.append(entry)
        batch.waiters.append(waiter)
        return waiter

    def _write_batch(self) -> None:
        batch, self._batch = self._batch, None
        assert batch is not None
        try:
            segment = self._segment_to_write()
            try:
                segment.write(encode(batch.entries))
            except OSError:
                self._current = None  # its tail may be torn: the next batch starts a fresh one
                raise
        except OSError as exc:
            log.error("usage_journal_write_failed", error=str(exc))
            batch.settle(exc)
            return
        segment.uncommitted += len(batch.entries)
        with self._lock:
            self._dirty.add(segment)
            if self._sync_before_answer:
                self._unsynced.append((segment, batch))
            self._written_batches += 1
            if self._sync_idle:
                self._wanted.notify()
        if not self._sync_before_answer:
            self._on_durable(batch.entries)
            batch.settle()

    def _segment_to_write(self) -> Segment:
        """The current segment, or the spare once the current one is due to be left."""
        current, spare = self._current, self._spare
        assert spare is not None, "open() first"
        if current is not None and (
            current.size < self._recycle_bytes
            or (current.uncommitted and current.size < self._segment_bytes)
            or not spare.done()
        ):
            return current
        if not spare.done():  # the current one failed a write, and the spare is still coming
            raise OSError("no journal segment is ready to write")
        self._spare = self._new_spare()
        try:
            fresh = spare.result()
        except OSError:
            if current is None:
                raise
            return current
        self._current = fresh
        self._segments.append(fresh)
        if current is not None and current.uncommitted == 0:
            self._retire(current)
        return fresh

    @property
    def _zeroed(self) -> int:
        """A segment's zeros: a little past where it is left once all of it is committed."""
        return self._recycle_bytes + (self._recycle_bytes >> 2)

    def _new_spare(self) -> Future[Segment]:
        return self._thread.submit(Segment.create, self._directory, zeroed=self._zeroed)

    def _retire(self, segment: Segment) -> None:
        """Delete `segment`, all of it committed, in the thread (after any fsync under way)."""
        self._segments.remove(segment)
        with self._lock:
            self._dirty.discard(segment)
        self._thread.submit(self._delete, segment)

    def _delete(self, segment: Segment) -> None:
        with self._syncing:
            segment.delete()

    def _sync_in_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """The sync thread: an fsync of what was written, and the next at once if there is more;
        each one's outcome is handed to the loop. It ends once closing finds nothing to sync."""
        yield_to_the_loop()
        while True:
            with self._lock:
                while not self._dirty and not self._closing:
                    self._sync_idle = True
                    self._wanted.wait()
                self._sync_idle = False
                if not self._dirty:
                    return
                dirty, self._dirty = self._dirty, set()
                unsynced, self._unsynced = self._unsynced, []
                covered = self._written_batches
                self._syncing.acquire()  # before a retired segment's delete can take it
            error: OSError | None = None
            try:
                _sync_all(dirty)
            except OSError as exc:
                error = exc
            finally:
                self._syncing.release()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(self._synced, unsynced, error, covered)
            if not self._sync_before_answer:
                with self._lock:  # `written`: the next fsync a little later, however busy
                    self._wanted.wait_for(lambda: self._closing, SYNC_BEHIND_S)

    def _synced(
        self, unsynced: list[tuple[Segment, _Batch]], error: OSError | None, covered: int
    ) -> None:
        """On the loop: an fsync's outcome for the batches it covered."""
        if error is not None:
            log.error("usage_journal_sync_failed", error=str(error))
        for segment, batch in unsynced:
            if error is not None:
                segment.uncommitted -= len(batch.entries)  # never queued: 503 answers
            else:
                self._on_durable(batch.entries)
            batch.settle(error)
        self._synced_batches = covered
        if self._caught_up is not None and not self._caught_up.done():
            self._caught_up.set_result(None)

    def committed(self, count: int) -> None:
        """`count` more records, oldest first, are in the database: drop what holds only them."""
        while self._segments:
            oldest = self._segments[0]
            taken = min(count, oldest.uncommitted)
            oldest.uncommitted -= taken
            count -= taken
            if oldest.uncommitted or oldest is self._current:
                return
            self._retire(oldest)

    async def drain(self) -> None:
        """Wait until everything appended is written and synced."""
        while self._batch is not None or self._synced_batches < self._written_batches:
            if self._batch is not None:
                await asyncio.sleep(0)  # this turn's batch is written at the next
            else:
                self._caught_up = asyncio.get_running_loop().create_future()
                await self._caught_up

    def close(self) -> None:
        """Delete the segments that hold nothing uncommitted; release the others' locks."""
        if self._syncer is not None:
            with self._lock:
                self._closing = True
                self._wanted.notify()
            self._syncer.join()
        self._thread.shutdown(wait=True)
        if self._spare is not None and self._spare.exception() is None:
            self._spare.result().delete()
        for segment in self._segments:
            if segment.uncommitted == 0:
                segment.delete()
            else:
                os.close(segment.fd)
                log.error(
                    "usage_left_in_journal", records=segment.uncommitted, file=segment.path.name
                )
        self._segments.clear()
        self._current = self._spare = None

    def dump(self, entries: list[UsageEntry]) -> None:
        """Write `entries` to a segment of their own for the next start (write-behind shutdown)."""
        self._directory.mkdir(parents=True, exist_ok=True)
        segment = Segment.create(self._directory)
        segment.write(encode(entries))
        segment.sync()
        os.close(segment.fd)
        log.error("usage_left_in_journal", records=len(entries), file=segment.path.name)
