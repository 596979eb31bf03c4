"""Model administration: which versions exist, and switching the one that serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.dependencies import AdminCaller, DbSession, ResourcesDep
from service.api.problems import error_responses
from service.api.staff import audit_change, require_platform_staff
from service.resources import Resources
from service.serving.registry import ModelError, list_versions, read_manifest
from service.serving.schemas import ModelsPublic, ModelVersionPublic
from tenants import repository
from tenants.errors import (
    Conflict,
    Forbidden,
    InvalidCredentials,
    MissingCredentials,
    NotFound,
    ValidationFailed,
)

router = APIRouter(
    prefix="/v1/admin/models",
    tags=["admin"],
    responses=error_responses(MissingCredentials, InvalidCredentials, Forbidden, NotFound),
)


def _models_public(resources: Resources) -> ModelsPublic:
    return ModelsPublic(
        active=resources.models.current.version,
        versions=[
            ModelVersionPublic.model_validate(m.public())
            for m in list_versions(resources.settings.model_dir)
        ],
    )


@router.get("", response_model=ModelsPublic)
async def list_models(staff: AdminCaller, resources: ResourcesDep) -> ModelsPublic:
    return _models_public(resources)


@router.post(
    "/{version}/activate",
    response_model=ModelsPublic,
    responses=error_responses(Conflict, ValidationFailed),
)
async def activate_model(
    request: Request,
    version: str,
    staff: AdminCaller,
    resources: ResourcesDep,
    session: DbSession,
) -> ModelsPublic:
    require_platform_staff(staff)
    try:
        read_manifest(resources.settings.model_dir, version)
    except ModelError:
        raise NotFound(f"No model version {version!r}.") from None
    try:
        # Load here first: a version that fails its checksum is refused, not half-activated.
        await resources.models.activate(version)
    except ModelError as exc:
        raise Conflict(str(exc)) from None
    repository.set_active_model(session, version)
    audit_change(session, request, staff, "model.activate", version, None)
    return _models_public(resources)
