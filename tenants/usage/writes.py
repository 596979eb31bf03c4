"""Usage records into `usage_records`, through the database driver: the flush's one statement.

NOTE: the flush runs in a thread, and whatever Python it runs holds the GIL that the event
loop needs. Through SQLAlchemy's ORM-free `execute` a row still cost ~14 µs of Python (bind
processing, insertmanyvalues batching) on either database. Here each row is one list of
already-converted values, built once; the driver does the rest in C:
- PostgreSQL: `COPY … FROM STDIN` (~4 to 6 µs a row, most of it not holding the GIL). COPY
  cannot skip existing ids, so when one is already there (a flush retried after a lost
  commit, a journal replayed) the same rows go again as `INSERT … ON CONFLICT DO NOTHING`.
- SQLite: one prepared `INSERT … ON CONFLICT DO NOTHING`, `executemany` over the rows;
  sqlite3 releases the GIL while it steps.
Values are converted by the columns' own SQLAlchemy types, so rows are stored exactly as the
queries (which go through SQLAlchemy) expect to read them; on SQLite the time by an equivalent
of its type's conversion (~0.6 against ~3 µs a row; `tests/test_usage_writes.py` holds them
equal). A row's fields are read in one `attrgetter` call and only the columns that need it are
converted: ~2.5 µs of Python a row (holding the GIL) where it was ~3.8.
"""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from tenants.tables import UsageRecord
from tenants.usage.records import UsageEntry

_COLUMNS = tuple(UsageRecord.__table__.columns)  # type: ignore[attr-defined]
_NAMES = tuple(column.name for column in _COLUMNS)
_COLUMN_LIST = ", ".join(_NAMES)
WRITE_ERRORS = (SQLAlchemyError, OSError, sqlite3.Error, psycopg.Error)
"""What a failed write raises: the pool's (connecting) or the driver's own (writing)."""


_FIELDS = operator.attrgetter(*_NAMES)
"""An entry's values in the columns' order, as one tuple."""


def sqlite_utc_text(value: datetime) -> str:
    """An aware time as SQLAlchemy's SQLite `DateTime` (behind SQLModel's UTCDateTime) stores it:
    in UTC, without an offset, to the microsecond; a naive one is refused, as there."""
    if value.utcoffset() is None:
        raise ValueError("a usage record's time must be aware")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _converters(engine: Engine) -> list[tuple[int, Callable[[Any], Any]]]:
    """For each column whose values the driver cannot take as they are: its index, its converter."""
    dialect = engine.dialect
    found = []
    for index, column in enumerate(_COLUMNS):
        convert = column.type.dialect_impl(dialect).bind_processor(dialect)
        if convert is not None:
            if dialect.name == "sqlite" and column.name == "at":
                convert = sqlite_utc_text
            found.append((index, convert))
    return found


class UsageWriter:
    """Writes a batch of entries in one transaction, skipping ids already stored."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._converters = _converters(engine)
        self._postgresql = engine.dialect.name == "postgresql"
        marker = "%s" if self._postgresql else "?"
        # Built from the table's own column names: no outside text reaches the statement.
        self._insert = (
            f"INSERT INTO usage_records ({_COLUMN_LIST}) "  # noqa: S608
            f"VALUES ({', '.join(marker for _ in _NAMES)}) ON CONFLICT (id) DO NOTHING"
        )
        self._copy = f"COPY usage_records ({_COLUMN_LIST}) FROM STDIN"

    def _rows(self, entries: Sequence[UsageEntry]) -> list[list[Any]]:
        rows = []
        for entry in entries:
            row = list(_FIELDS(entry))
            for index, convert in self._converters:
                row[index] = convert(row[index])
            rows.append(row)
        return rows

    def write(self, entries: Sequence[UsageEntry]) -> None:
        rows = self._rows(entries)
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                if self._postgresql:
                    self._copy_or_insert(connection, cursor, rows)
                else:
                    cursor.executemany(self._insert, rows)
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
            finally:
                cursor.close()
        finally:
            connection.close()  # back to the pool

    def _copy_or_insert(self, connection: Any, cursor: Any, rows: list[list[Any]]) -> None:
        try:
            with cursor.copy(self._copy) as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.errors.UniqueViolation:
            connection.rollback()
            cursor.executemany(self._insert, rows)
