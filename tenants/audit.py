"""The admin audit log: who changed what, and every failed sign-in."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from tenants.paging import newest_first, page_of
from tenants.schemas import AuditEventPage, AuditEventPublic
from tenants.tables import AuditEvent


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str | None,
    tenant_id: str | None,
    request_id: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    """Adds the event to the caller's transaction: it commits with the change it describes."""
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            target=target,
            tenant_id=tenant_id,
            details=details or {},
            request_id=request_id,
        )
    )


def list_events(
    session: Session, *, scope: str | None, limit: int, cursor: str | None
) -> AuditEventPage:
    query = select(AuditEvent)
    if scope is not None:
        query = query.where(col(AuditEvent.tenant_id) == scope)
    query = newest_first(query, AuditEvent.at, AuditEvent.id, cursor=cursor, limit=limit)
    rows = list(session.exec(query).all())
    items, next_cursor = page_of(rows, limit, key=lambda e: (e.at, e.id))
    return AuditEventPage(
        items=[AuditEventPublic.model_validate(e, from_attributes=True) for e in items],
        next_cursor=next_cursor,
    )
