"""Reading usage: auditors' filters, pages, summaries and CSV export; a tenant's own totals.

Every query goes through `_filtered`, which applies the caller's tenant scope first.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Engine, case, func
from sqlmodel import Session, col, select

from tenants.errors import NotFound
from tenants.paging import newest_first, page_of
from tenants.tables import UsageRecord

GroupBy = Literal["tenant", "key", "day"]
CSV_COLUMNS = (
    "id", "at", "request_id", "tenant_id", "key_id", "method", "path", "status_code", "items",
    "latency_ms", "model_version", "replay",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class UsageFilter:
    tenant_id: str | None = None
    key_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    status_code: int | None = None
    path: str | None = None

    def scoped(self, scope: str | None) -> UsageFilter:
        """The filter a tenant-scoped caller may run: their tenant, or 404 for another."""
        if scope is None:
            return self
        if self.tenant_id not in (None, scope):
            raise NotFound()
        return UsageFilter(scope, self.key_id, self.start, self.end, self.status_code, self.path)


def _filtered(query: Any, f: UsageFilter) -> Any:
    if f.tenant_id is not None:
        query = query.where(col(UsageRecord.tenant_id) == f.tenant_id)
    if f.key_id is not None:
        query = query.where(col(UsageRecord.key_id) == f.key_id)
    if f.start is not None:
        query = query.where(col(UsageRecord.at) >= as_utc(f.start))
    if f.end is not None:
        query = query.where(col(UsageRecord.at) < as_utc(f.end))
    if f.status_code is not None:
        query = query.where(col(UsageRecord.status_code) == f.status_code)
    if f.path is not None:
        query = query.where(col(UsageRecord.path) == f.path)
    return query


def as_utc(moment: datetime) -> datetime:
    """Query times without a zone are read as UTC, the zone every record is kept in."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def page(
    session: Session, f: UsageFilter, *, limit: int, cursor: str | None
) -> tuple[list[UsageRecord], str | None]:
    query = newest_first(
        _filtered(select(UsageRecord), f),
        UsageRecord.at,
        UsageRecord.id,
        cursor=cursor,
        limit=limit,
    )
    rows = list(session.exec(query).all())
    return page_of(rows, limit, key=lambda r: (r.at, r.id))


_ERRORS = func.sum(case((col(UsageRecord.status_code) >= 400, 1), else_=0))


def totals(session: Session, f: UsageFilter) -> tuple[int, int, int]:
    """(requests, predictions, errors) matching the filter."""
    query = _filtered(
        select(func.count(), func.coalesce(func.sum(UsageRecord.items), 0), _ERRORS), f
    )
    requests, predictions, errors = session.execute(query).one()
    return int(requests), int(predictions or 0), int(errors or 0)


def predictions_since(session: Session, tenant_id: str, since: datetime) -> int:
    return totals(session, UsageFilter(tenant_id=tenant_id, start=since))[1]


def summary(session: Session, f: UsageFilter, group_by: GroupBy) -> list[dict[str, Any]]:
    group: Any
    if group_by == "day":
        dialect = session.get_bind().dialect.name
        group = (
            # In UTC whatever the session's time zone, like every time the API shows.
            func.to_char(func.timezone("UTC", UsageRecord.at), "YYYY-MM-DD")
            if dialect == "postgresql"
            else func.strftime("%Y-%m-%d", UsageRecord.at)
        )
    else:
        group = col(UsageRecord.tenant_id if group_by == "tenant" else UsageRecord.key_id)
    query = (
        _filtered(
            select(group, func.count(), func.coalesce(func.sum(UsageRecord.items), 0), _ERRORS), f
        )
        .group_by(group)
        .order_by(group)
    )
    return [
        {"group": str(g), "requests": int(r), "predictions": int(p or 0), "errors": int(e or 0)}
        for g, r, p, e in session.execute(query).all()
    ]


def export_csv(engine: Engine, f: UsageFilter) -> Iterator[str]:
    """CSV text in chunks, read through a server-side cursor: memory stays flat at any size."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    columns = [getattr(UsageRecord, name) for name in CSV_COLUMNS]
    query = _filtered(select(*columns), f).order_by(
        col(UsageRecord.at).desc(), col(UsageRecord.id).desc()
    )
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=2000).execute(query)
        for partition in result.partitions():
            for row in partition:
                writer.writerow([v.isoformat() if isinstance(v, datetime) else v for v in row])
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
