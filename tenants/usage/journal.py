"""The usage journal: records made durable on local disk before their answers leave.

Each worker appends to its own segment file, one line a record: the CRC-32 of the JSON (8 hex
digits), a space, the JSON. Records arriving while a write is in flight wait for the next one,
so one `fsync` (in a thread: the event loop keeps serving) makes a whole group durable
(group commit). A segment is deleted once every record in it is committed to the database,
and replaced by a fresh one when it grows past `segment_bytes`; the one in use is truncated
whenever everything in it is committed.

Every open segment is held under an exclusive `flock`, which dies with its process: at start,
a worker claims each segment nobody holds (left by a crash, a kill, or a shutdown the database
would not wait for) and replays it. Replaying is safe whenever it happens, because records
are inserted idempotently on their id. A line torn by a crash mid-write ends the file's
readable part; a line whose checksum or JSON is wrong is reported once and skipped.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import structlog

from tenants.usage.records import UsageEntry

log = structlog.get_logger("tenantserve.usage")
SEGMENT_GLOB = "usage-*.journal"


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
    """Records written here (and queued) that the database has not committed yet."""

    @classmethod
    def create(cls, directory: Path) -> Segment:
        # Locked before it is visible under a name other workers claim.
        name = f"usage-{os.getpid()}-{time.time_ns()}.journal"
        hidden = directory / f".{name}"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
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

    def append(self, data: bytes) -> None:
        os.write(self.fd, data)
        os.fsync(self.fd)
        self.size += len(data)

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.size = 0

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _sync_directory(directory: Path) -> None:
    """Make a new or renamed file's name durable too, not only its content."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class _Group:
    entries: list[UsageEntry] = field(default_factory=list)
    durable: asyncio.Future[None] | None = None


class UsageJournal:
    """Group-committed, per-worker journal segments, and the orphans this worker replays."""

    def __init__(
        self,
        directory: Path,
        on_durable: Callable[[list[UsageEntry]], None],
        *,
        segment_bytes: int = 4 << 20,
    ) -> None:
        self._directory = directory
        self._on_durable = on_durable
        """Where records go once on disk (the recorder's queue), in the order written."""
        self._segment_bytes = segment_bytes
        self._segments: deque[Segment] = deque()
        """Oldest first, in the order their records sit in the recorder's queue."""
        self._current: Segment | None = None
        self._waiting = _Group()
        self._writer: asyncio.Task[None] | None = None
        # A thread of its own, handed each group without a copy of the context: on a small VM
        # that is ~70 µs of CPU a group where `asyncio.to_thread` took ~90 (perf/README.md).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-journal")

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

    def append(self, entry: UsageEntry) -> asyncio.Future[None]:
        """A future done once `entry` is on disk; the entry joins the next group written."""
        group = self._waiting
        group.entries.append(entry)
        if group.durable is None:
            group.durable = asyncio.get_running_loop().create_future()
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_groups())
        return group.durable

    async def _write_groups(self) -> None:
        try:
            while self._waiting.entries:
                group, self._waiting = self._waiting, _Group()
                assert group.durable is not None
                try:
                    segment = await asyncio.get_running_loop().run_in_executor(
                        self._thread, self._write, group.entries
                    )
                except OSError as exc:
                    log.error("usage_journal_write_failed", error=str(exc))
                    group.durable.set_exception(exc)
                    continue
                segment.uncommitted += len(group.entries)
                self._on_durable(group.entries)
                group.durable.set_result(None)
        finally:
            self._writer = None

    def _write(self, entries: list[UsageEntry]) -> Segment:
        """In the writer thread, one group at a time: the only place segments are created,
        written or truncated. (A segment's `uncommitted` only grows after this returns, so
        when it reads 0 here nothing in the file is still needed.)"""
        data = encode(entries)
        current = self._current
        if current is not None and current.uncommitted == 0 and current.size:
            current.truncate()
        elif current is None or current.size >= self._segment_bytes:
            current = self._current = Segment.create(self._directory)
            self._segments.append(current)
        current.append(data)
        return current

    def committed(self, count: int) -> None:
        """`count` more records, oldest first, are in the database: drop what holds only them."""
        while self._segments:
            oldest = self._segments[0]
            taken = min(count, oldest.uncommitted)
            oldest.uncommitted -= taken
            count -= taken
            if oldest.uncommitted or oldest is self._current:
                return
            self._segments.popleft().delete()

    async def drain(self) -> None:
        """Wait for the writes under way."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    def close(self) -> None:
        """Delete the segments that hold nothing uncommitted; release the others' locks."""
        self._thread.shutdown(wait=True)
        for segment in self._segments:
            if segment.uncommitted == 0:
                segment.delete()
            else:
                os.close(segment.fd)
                log.error(
                    "usage_left_in_journal", records=segment.uncommitted, file=segment.path.name
                )
        self._segments.clear()
        self._current = None

    def dump(self, entries: list[UsageEntry]) -> None:
        """Write `entries` to a segment of their own for the next start (write-behind shutdown)."""
        self._directory.mkdir(parents=True, exist_ok=True)
        segment = Segment.create(self._directory)
        segment.append(encode(entries))
        os.close(segment.fd)
        log.error("usage_left_in_journal", records=len(entries), file=segment.path.name)
