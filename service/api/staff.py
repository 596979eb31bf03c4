"""What every staff change does: check the caller's reach, and write the audit event with it."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlmodel import Session

from auth.principals import Staff
from service.api.context import context_of
from tenants import audit
from tenants.errors import Forbidden


def require_platform_staff(staff: Staff) -> None:
    """Platform-wide operations are not for staff of one tenant."""
    if staff.tenant_id is not None:
        raise Forbidden("Only platform admins may do this.")


def audit_change(
    session: Session,
    request: Request,
    staff: Staff,
    action: str,
    target: str,
    tenant_id: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    """The audit event, in the same unit of work as the change it describes."""
    audit.record(
        session,
        actor=staff.username,
        action=action,
        target=target,
        tenant_id=tenant_id,
        request_id=context_of(request).request_id,
        details=details,
    )
