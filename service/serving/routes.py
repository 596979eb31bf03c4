"""Model administration: which versions exist, and switching the one that serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlmodel import Session

from service.api.dependencies import AdminCaller, DbSession, ResourcesDep
from service.api.idempotency import AdminIdempotent, openapi_extra
from service.api.problems import error_responses
from service.api.staff import audit_change, require_platform_staff
from service.resources import Resources
from service.serving.registry import ModelError, list_versions, read_manifest
from service.serving.schemas import (
    ModelsPublic,
    ModelVersionPublic,
    RolloutPublic,
    RolloutRequest,
)
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
from tenants.rollout import PlatformVersions

router = APIRouter(
    prefix="/v1/admin/models",
    tags=["admin"],
    responses=error_responses(MissingCredentials, InvalidCredentials, Forbidden, NotFound),
)
# Activation and rollout: platform admins only, idempotent, answered with the versions now served.
_CHANGES_VERSIONS: dict[str, Any] = {
    "response_model": ModelsPublic,
    "responses": error_responses(
        Conflict, ValidationFailed, IdempotencyConflict, IdempotencyMismatch
    ),
    "dependencies": [AdminIdempotent],
    "openapi_extra": openapi_extra(200),
}


def _models_public(resources: Resources) -> ModelsPublic:
    platform = resources.models.platform
    rollout = (
        RolloutPublic(version=platform.rollout_version, percent=platform.rollout_percent)
        if platform.rollout_version is not None
        else None
    )
    return ModelsPublic(
        active=platform.active,
        rollout=rollout,
        versions=[
            ModelVersionPublic.model_validate(m.public())
            for m in list_versions(resources.settings.model_dir)
        ],
    )


async def _serve(resources: Resources, session: Session, version: str, *, percent: int) -> None:
    """Serve `version` to `percent` of the unpinned tenants (100: all, i.e. activate): in this
    worker from the answer on, in every other through the control row this commits.

    Committed here, with the audit event, before this worker switches: the change watcher,
    kept out meanwhile, then reads the new row, never one that this switch has outdated."""
    await _load(resources, version)
    models = resources.models
    async with models.switching:
        if percent == 100:
            repository.set_active_model(session, version)
            platform = PlatformVersions(active=version)
        else:
            repository.set_rollout(session, version, percent)
            platform = PlatformVersions(
                models.platform.active, version if percent else None, percent
            )
        session.commit()
        await models.set_platform(platform)


@router.get("", response_model=ModelsPublic)
async def list_models(staff: AdminCaller, resources: ResourcesDep) -> ModelsPublic:
    return _models_public(resources)


@router.post("/{version}/activate", **_CHANGES_VERSIONS)
async def activate_model(
    request: Request,
    version: str,
    staff: AdminCaller,
    resources: ResourcesDep,
    session: DbSession,
) -> ModelsPublic:
    require_platform_staff(staff)
    audit_change(session, request, staff, "model.activate", version, None)
    await _serve(resources, session, version, percent=100)
    return _models_public(resources)


@router.post("/{version}/rollout", **_CHANGES_VERSIONS)
async def roll_out_model(
    request: Request,
    version: str,
    data: RolloutRequest,
    staff: AdminCaller,
    resources: ResourcesDep,
    session: DbSession,
) -> ModelsPublic:
    """Serve `version` to a stable share of the unpinned tenants (by a hash of the tenant id)."""
    require_platform_staff(staff)
    details = {"percent": data.percent}
    audit_change(session, request, staff, "model.rollout", version, None, details)
    await _serve(resources, session, version, percent=data.percent)
    return _models_public(resources)


async def _load(resources: Resources, version: str) -> None:
    """404 for an unknown version; 409 for one that fails its checks: refused, not half-served."""
    try:
        read_manifest(resources.settings.model_dir, version)
    except ModelError:
        raise NotFound(f"No model version {version!r}.") from None
    try:
        await resources.models.preload(version)
    except ModelError as exc:
        raise Conflict(str(exc)) from None
