"""Admin routes: tenants, keys, staff users. Auditors get 403, other tenants 404.

Every change is written together with its audit event, in the request's one unit of work.
"""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Request, status
from sqlmodel import Session

from auth.principals import Scope
from service.api.dependencies import AdminCaller, DbSession, ResourcesDep
from service.api.idempotency import AdminIdempotent, openapi_extra
from service.api.problems import error_responses
from service.api.staff import audit_change, require_platform_staff
from service.serving.registry import ModelError, read_manifest
from tenants import repository
from tenants.errors import (
    Conflict,
    Forbidden,
    IdempotencyConflict,
    IdempotencyMismatch,
    InvalidCredentials,
    MissingCredentials,
    NotFound,
    ValidationFailed,
)
from tenants.schemas import (
    KeyCreate,
    KeyIssued,
    KeyPublic,
    KeyRotate,
    TenantCreate,
    TenantPublic,
    TenantUpdate,
    UserCreate,
    UserPublic,
)
from tenants.tables import Tenant

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    responses=error_responses(MissingCredentials, InvalidCredentials, Forbidden, NotFound),
)
_IDEMPOTENCY_ERRORS = (IdempotencyConflict, IdempotencyMismatch)
_WRITE_ERRORS = error_responses(Conflict, ValidationFailed, *_IDEMPOTENCY_ERRORS)
_IDEMPOTENT = [AdminIdempotent]
"""Every admin POST takes an optional Idempotency-Key."""


_PLATFORM_FIELDS = {
    "status", "rate_limit", "max_batch_size", "monthly_quota", "model_version",
    "allow_version_choice",
}  # fmt: skip


def _tenant_public(tenant: Tenant) -> TenantPublic:
    return TenantPublic.model_validate(tenant, from_attributes=True)


# Tenants


@router.post(
    "/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantPublic,
    responses=_WRITE_ERRORS, dependencies=_IDEMPOTENT, openapi_extra=openapi_extra(201),
)  # fmt: skip
def create_tenant(
    request: Request,
    data: TenantCreate,
    staff: AdminCaller,
    session: DbSession,
    resources: ResourcesDep,
) -> TenantPublic:
    require_platform_staff(staff)
    tenant = repository.create_tenant(
        session,
        data,
        default_rate_limit=resources.settings.default_rate_limit,
        default_max_batch=resources.settings.max_batch_size,
    )
    public = _tenant_public(tenant)
    audit_change(session, request, staff, "tenant.create", tenant.id, tenant.id, data.model_dump())
    return public


@router.get("/tenants", response_model=list[TenantPublic])
def list_tenants(staff: AdminCaller, session: DbSession) -> list[TenantPublic]:
    return [_tenant_public(t) for t in repository.list_tenants(session, scope=staff.tenant_id)]


@router.get("/tenants/{tenant_id}", response_model=TenantPublic)
def get_tenant(tenant_id: str, staff: AdminCaller, session: DbSession) -> TenantPublic:
    return _tenant_public(repository.get_tenant(session, tenant_id, scope=staff.tenant_id))


@router.patch("/tenants/{tenant_id}", response_model=TenantPublic, responses=_WRITE_ERRORS)
def update_tenant(
    request: Request,
    tenant_id: str,
    data: TenantUpdate,
    staff: AdminCaller,
    session: DbSession,
    resources: ResourcesDep,
) -> TenantPublic:
    repository.get_tenant(session, tenant_id, scope=staff.tenant_id)  # another tenant's: 404
    platform_only = data.model_fields_set & _PLATFORM_FIELDS
    if staff.tenant_id is not None and platform_only:
        # A tenant's own admin must not lift a suspension, raise its own limits and quota, or
        # choose what serves it.
        raise Forbidden(f"Only platform admins may change {', '.join(sorted(platform_only))}.")
    if data.model_version is not None:
        try:
            read_manifest(resources.settings.model_dir, data.model_version)
        except ModelError:
            raise ValidationFailed(
                [{"loc": ["body", "model_version"], "msg": "no such registered model version"}]
            ) from None
    tenant, changes = repository.update_tenant(session, tenant_id, data, scope=staff.tenant_id)
    public = _tenant_public(tenant)
    action = {"suspended": "tenant.suspend", "active": "tenant.activate"}.get(
        changes.get("status", ""), "tenant.update"
    )
    audit_change(session, request, staff, action, tenant.id, tenant.id, changes)
    return public


# API keys


def _issue(session: Session, resources: ResourcesDep, tenant: Tenant, data: KeyCreate) -> KeyIssued:
    """A new key in the open transaction; its secret is in this answer and nowhere else."""
    pepper = resources.settings.api_key_pepper.get_secret_value()
    key, token = repository.issue_key(session, tenant, data, pepper=pepper)
    return KeyIssued(**repository.key_public(key).model_dump(), key=token)


@router.post(
    "/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyIssued,
    responses=_WRITE_ERRORS, dependencies=_IDEMPOTENT, openapi_extra=openapi_extra(201),
)  # fmt: skip
def issue_key(
    request: Request,
    tenant_id: str,
    data: KeyCreate,
    staff: AdminCaller,
    session: DbSession,
    resources: ResourcesDep,
) -> KeyIssued:
    tenant = repository.get_tenant(session, tenant_id, scope=staff.tenant_id)
    issued = _issue(session, resources, tenant, data)
    audit_change(session, request, staff, "key.issue", issued.id, tenant.id, {"name": data.name})
    return issued


@router.get("/tenants/{tenant_id}/keys", response_model=list[KeyPublic])
def list_keys(tenant_id: str, staff: AdminCaller, session: DbSession) -> list[KeyPublic]:
    keys = repository.list_keys(session, tenant_id, scope=staff.tenant_id)
    return [repository.key_public(k) for k in keys]


@router.post(
    "/keys/{key_id}/revoke", response_model=KeyPublic, openapi_extra=openapi_extra(200),
    responses=error_responses(*_IDEMPOTENCY_ERRORS), dependencies=_IDEMPOTENT,
)  # fmt: skip
def revoke_key(request: Request, key_id: str, staff: AdminCaller, session: DbSession) -> KeyPublic:
    key = repository.get_key(session, key_id, scope=staff.tenant_id)
    repository.revoke_key(session, key)
    public = repository.key_public(key)
    audit_change(session, request, staff, "key.revoke", key.id, key.tenant_id)
    return public


@router.post(
    "/keys/{key_id}/rotate", status_code=status.HTTP_201_CREATED, response_model=KeyIssued,
    responses=_WRITE_ERRORS, dependencies=_IDEMPOTENT, openapi_extra=openapi_extra(201),
)  # fmt: skip
def rotate_key(
    request: Request,
    key_id: str,
    staff: AdminCaller,
    session: DbSession,
    resources: ResourcesDep,
    data: KeyRotate | None = None,
) -> KeyIssued:
    grace = (data or KeyRotate()).grace_seconds
    old = repository.get_key(session, key_id, scope=staff.tenant_id)
    if repository.key_status(old) == "revoked":
        raise Conflict("A revoked key cannot be rotated; issue a new one.")
    tenant = repository.get_tenant(session, old.tenant_id, scope=staff.tenant_id)
    replacement = KeyCreate.model_construct(
        name=old.name, scopes=cast(list[Scope], old.scopes.split()), rate_limit=old.rate_limit,
        expires_at=old.expires_at,
    )  # fmt: skip
    issued = _issue(session, resources, tenant, replacement)
    repository.revoke_key(session, old, after_seconds=grace)
    details = {"replaced_by": issued.id, "grace_seconds": grace}
    audit_change(session, request, staff, "key.rotate", old.id, old.tenant_id, details)
    return issued


# Staff users


@router.post(
    "/users", status_code=status.HTTP_201_CREATED, response_model=UserPublic,
    responses=_WRITE_ERRORS, dependencies=_IDEMPOTENT, openapi_extra=openapi_extra(201),
)  # fmt: skip
def create_user(
    request: Request,
    data: UserCreate,
    staff: AdminCaller,
    session: DbSession,
    resources: ResourcesDep,
) -> UserPublic:
    if staff.tenant_id is not None:
        if data.tenant_id is None:
            raise Forbidden("Tenant admins create users of their own tenant only.")
        repository.get_tenant(session, data.tenant_id, scope=staff.tenant_id)
    user = repository.create_user(
        session, data, password_hash=resources.passwords.hash(data.password)
    )
    public = UserPublic.model_validate(user, from_attributes=True)
    details = {"username": user.username, "role": user.role}
    audit_change(session, request, staff, "user.create", user.id, user.tenant_id, details)
    return public
