"""One usage record as it travels: built when a response starts, journalled, queued, written."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class UsageEntry:
    id: str
    """Made by the worker: a retried write cannot insert the record twice."""
    at: datetime
    request_id: str
    tenant_id: str
    key_id: str
    method: str
    path: str
    status_code: int
    items: int
    latency_ms: float
    model_version: str | None
    replay: bool = False
    """An idempotent replay of an earlier answer: nothing was served again (`items` is 0)."""

    @classmethod
    def from_row(cls, row: object) -> UsageEntry:
        """The entry a stored `usage_records` row holds: what auditors read back."""
        return cls(**{name: getattr(row, name) for name in cls.__slots__})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageEntry:
        """From `orjson.dumps(entry)`: the fields by name, the time in ISO 8601."""
        return cls(**{**data, "at": datetime.fromisoformat(data["at"])})


def month_start(now: datetime) -> datetime:
    """The start of `now`'s calendar month: quotas count from here."""
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime) -> datetime:
    start = month_start(now)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


@dataclass(frozen=True, slots=True)
class Month:
    """A calendar month (UTC): what a quota counts."""

    label: str
    """`2026-12`: its quota counters are named by it."""
    start: datetime
    starts_at: float
    """`start` in POSIX seconds."""
    ends_at: float
    """The next month's start, in POSIX seconds."""

    @classmethod
    def of(cls, now: datetime) -> Month:
        start = month_start(now)
        return cls(f"{start:%Y-%m}", start, start.timestamp(), next_month_start(now).timestamp())

    def seconds_left(self, now: float) -> float:
        return self.ends_at - now


_month: Month | None = None


def current_month(now: float) -> Month:
    """The month `now` (POSIX seconds) falls in.

    NOTE: made once a month, not once a request: formatting the month's name and finding the
    next month's start were ~3 µs of every quota'd prediction.
    """
    global _month
    month = _month
    if month is None or not month.starts_at <= now < month.ends_at:
        month = _month = Month.of(datetime.fromtimestamp(now, UTC))
    return month
