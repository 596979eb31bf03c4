"""Each worker's view of changes made by any worker or instance, within a fraction of a second.

One cheap query (the `PlatformControl` row) every `state_poll_interval_ms`: a changed auth epoch
clears the key cache (revocations, rotations, suspensions, limit changes, pins) and loads the
versions tenants are pinned to; a changed active version or rollout is loaded and swapped in.
No request ever waits for this.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from service.resources import Resources
from service.serving.registry import ModelError
from tenants.database import unit_of_work
from tenants.repository import pinned_versions, read_control
from tenants.rollout import PlatformVersions

log = structlog.get_logger("tenantserve.changes")


def _read(engine: Engine) -> tuple[int, str | None, str | None, int]:
    with unit_of_work(engine) as session:
        control = read_control(session)
        return (
            control.auth_epoch,
            control.active_model_version,
            control.rollout_version,
            control.rollout_percent,
        )


def _read_pins(engine: Engine) -> set[str]:
    with unit_of_work(engine) as session:
        return pinned_versions(session)


async def _load_pins(resources: Resources) -> None:
    """Every version a tenant is pinned to, loaded before its first request needs it."""
    for version in sorted(await asyncio.to_thread(_read_pins, resources.engine)):
        with suppress(ModelError, OSError):  # recorded in `refused`, shown on /ready
            await resources.models.preload(version)


async def watch_changes(resources: Resources) -> None:
    epoch: int | None = None  # the first look applies everything
    # What the row said last time: only a change of the row is applied. (Comparing with what
    # this worker serves would undo its own activation when a read lands before that commit.)
    seen: tuple[str | None, str | None, int] | None = None
    interval = resources.settings.state_poll_interval_ms / 1000
    models = resources.models
    while True:
        if epoch is not None:
            await asyncio.sleep(interval)
        try:
            new_epoch, active, rollout, percent = await asyncio.to_thread(_read, resources.engine)
            if new_epoch != epoch:
                # Revocations, suspensions, limit changes and pins: keys are read afresh.
                resources.keys.clear()
                epoch = new_epoch
                await _load_pins(resources)
        except SQLAlchemyError as exc:
            if resources.database_ok:
                log.warning("database_unreachable", error=type(exc).__name__)
            resources.database_ok = False
            continue
        if not resources.database_ok:
            log.warning("database_reachable_again")
            resources.database_ok = True
        if (active, rollout, percent) == seen:
            continue
        seen = (active, rollout, percent)
        platform = PlatformVersions(active or models.platform.active, rollout, percent)
        try:
            await models.set_platform(platform)  # a failed version is said once, not 4x/s
            log.info("model_versions_changed", model_version=platform.active,
                     rollout_version=rollout, rollout_percent=percent)  # fmt: skip
        except (ModelError, OSError) as exc:
            log.error("model_activation_failed", model_version=platform.active,
                      rollout_version=rollout, error=str(exc))  # fmt: skip
