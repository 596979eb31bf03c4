"""The auditor's API: usage records (filter, page, summarise, export) and the admin audit log."""

from __future__ import annotations

import asyncio
import itertools
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.api.dependencies import AuditorCaller, DbSession, ResourcesDep
from service.api.problems import error_responses
from tenants import audit
from tenants.errors import (
    Forbidden,
    InvalidCredentials,
    MissingCredentials,
    NotFound,
    ValidationFailed,
)
from tenants.schemas import NO_NUL, AuditEventPage, UtcMoment
from tenants.usage import queries as usage_queries
from tenants.usage.queries import GroupBy, UsageFilter
from tenants.usage.records import UsageEntry

router = APIRouter(
    prefix="/v1/audit",
    tags=["audit"],
    responses=error_responses(
        MissingCredentials, InvalidCredentials, Forbidden, NotFound, ValidationFailed
    ),
)


class UsagePage(BaseModel):
    items: list[UsageEntry]  # each record as it was built, journalled and written
    next_cursor: str | None


class UsageGroup(BaseModel):
    group: str
    requests: int
    predictions: int
    errors: int


class UsageSummary(BaseModel):
    groups: list[UsageGroup]


def usage_filter(
    staff: AuditorCaller,
    tenant_id: Annotated[str | None, Query(pattern=NO_NUL)] = None,
    key_id: Annotated[str | None, Query(pattern=NO_NUL)] = None,
    start: Annotated[UtcMoment | None, Query(alias="from")] = None,
    end: Annotated[UtcMoment | None, Query(alias="to")] = None,
    status_code: Annotated[int | None, Query(ge=100, le=599)] = None,
    path: Annotated[str | None, Query(pattern=NO_NUL)] = None,
) -> UsageFilter:
    """The query's filters, narrowed to the caller's tenant when they have one."""
    return UsageFilter(tenant_id, key_id, start, end, status_code, path).scoped(staff.tenant_id)


Filters = Annotated[UsageFilter, Depends(usage_filter)]


@router.get("/usage", response_model=UsagePage)
def list_usage(
    session: DbSession,
    filters: Filters,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> UsagePage:
    rows, next_cursor = usage_queries.page(session, filters, limit=limit, cursor=cursor)
    return UsagePage(
        items=[UsageEntry.from_row(row) for row in rows],
        next_cursor=next_cursor,
    )


@router.get("/usage/summary", response_model=UsageSummary)
def usage_summary(
    session: DbSession, filters: Filters, group_by: GroupBy = "tenant"
) -> UsageSummary:
    groups = usage_queries.summary(session, filters, group_by)
    return UsageSummary(groups=[UsageGroup(**g) for g in groups])


@router.get(
    "/usage/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "One row per record"}},
)
async def export_usage(resources: ResourcesDep, filters: Filters) -> StreamingResponse:
    # A stream, not a transaction: read through a server-side cursor as the client reads.
    chunks = usage_queries.export_csv(resources.engine, filters)
    # The query runs before the 200 is sent: an error then is still an error answer, not a
    # stream cut short.
    first = await asyncio.to_thread(next, chunks)
    return StreamingResponse(
        itertools.chain([first], chunks),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
    )


@router.get("/events", response_model=AuditEventPage)
def list_events(
    staff: AuditorCaller,
    session: DbSession,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> AuditEventPage:
    return audit.list_events(session, scope=staff.tenant_id, limit=limit, cursor=cursor)
