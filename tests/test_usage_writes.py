"""The usage flush's write (`tenants.usage.writes`), on both databases: what is written is what
auditors read back, and a batch written again (a flush retried after a lost commit, a journal
replayed after a crash) stores each record once. On PostgreSQL the second write is the COPY
that meets an existing id and falls back to INSERT … ON CONFLICT DO NOTHING."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite
from sqlmodel import Session, col, select

from tenants.database import make_engine
from tenants.tables import UsageRecord
from tenants.usage.records import UsageEntry
from tenants.usage.writes import UsageWriter, sqlite_utc_text


def _entry(offset_ms: int, **fields: object) -> UsageEntry:
    values: dict[str, object] = {
        "id": uuid.uuid4().hex,
        "at": datetime(2026, 12, 1, 23, 59, 59, 999_000, tzinfo=UTC)
        + timedelta(milliseconds=offset_ms),
        "request_id": f"req-{offset_ms}",
        "tenant_id": "tenant-a",
        "key_id": "key-a",
        "method": "POST",
        "path": "/v1/predict/batch",
        "status_code": 200,
        "items": 100,
        "latency_ms": 1.25,
        "model_version": "v2-logreg",
        **fields,
    }
    return UsageEntry(**values)  # type: ignore[arg-type]


def _stored(database_url: str) -> list[UsageEntry]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            rows = session.exec(select(UsageRecord).order_by(col(UsageRecord.at))).all()
            return [UsageEntry.from_row(row) for row in rows]
    finally:
        engine.dispose()


def test_a_batch_written_twice_stores_each_record_once(database_url: str) -> None:
    first = [
        _entry(0),
        _entry(1, status_code=429, items=0, model_version=None),  # refused: no version
        _entry(2, replay=True, items=0, latency_ms=0.125),
    ]
    new = _entry(3, method="GET", path="/v1/usage", status_code=200, items=0)
    engine = make_engine(database_url)
    try:
        writer = UsageWriter(engine)
        writer.write(first)
        writer.write([*first[1:], new])  # two already stored, one new
    finally:
        engine.dispose()

    stored = _stored(database_url)
    assert [entry.id for entry in stored] == [entry.id for entry in [*first, new]]
    for written, read in zip([*first, new], stored, strict=True):
        # Exactly what went in, the time included (the first crosses midnight UTC).
        assert read == written


@given(st.datetimes(timezones=st.timezones(), allow_imaginary=False))
def test_sqlite_times_are_written_as_the_column_type_writes_them(value: datetime) -> None:
    """The flush's own conversion of a time for SQLite, against the column type's."""
    dialect = sqlite.dialect()
    column_type = UsageRecord.__table__.c.at.type  # type: ignore[attr-defined]
    convert = column_type.dialect_impl(dialect).bind_processor(dialect)
    assert sqlite_utc_text(value) == convert(value)
