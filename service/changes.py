"""Each worker's view of changes made by any worker or instance, within a fraction of a second.

One cheap query (the `PlatformControl` row) every `state_poll_interval_ms`: a changed auth epoch
clears the key cache (revocations, rotations, suspensions, limit changes), a changed active
model version is loaded and swapped in. No request ever waits for this.
"""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from service.resources import Resources
from service.serving.registry import ModelError
from tenants.database import unit_of_work
from tenants.repository import read_control

log = structlog.get_logger("tenantserve.changes")


def _read(engine: Engine) -> tuple[int, str | None]:
    with unit_of_work(engine) as session:
        control = read_control(session)
        return control.auth_epoch, control.active_model_version


async def watch_changes(resources: Resources, *, initial_epoch: int) -> None:
    epoch = initial_epoch
    refused_version: str | None = None  # a version that failed to load: said once, not 4x/s
    interval = resources.settings.state_poll_interval_ms / 1000
    while True:
        await asyncio.sleep(interval)
        try:
            new_epoch, version = await asyncio.to_thread(_read, resources.engine)
        except SQLAlchemyError as exc:
            if resources.database_ok:
                log.warning("database_unreachable", error=type(exc).__name__)
            resources.database_ok = False
            continue
        if not resources.database_ok:
            log.warning("database_reachable_again")
            resources.database_ok = True
        if new_epoch != epoch:
            resources.keys.clear()
            epoch = new_epoch
        if version and version not in (resources.models.current.version, refused_version):
            try:
                await resources.models.activate(version)
                log.info("model_activated", model_version=version)
            except (ModelError, OSError) as exc:
                refused_version = version
                log.error("model_activation_failed", model_version=version, error=str(exc))
