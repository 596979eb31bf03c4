"""Each worker's view of changes made by any worker or instance, within a fraction of a second.

One cheap query (`control_state`, one row) every `state_poll_interval_ms`: a changed auth epoch
clears the key cache (revocations, rotations, suspensions, limit changes), a changed active
model version is loaded and swapped in. No request ever waits for this.
"""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from service.serving.registry import ModelError
from service.state import AppState
from tenants.repository import read_control

log = structlog.get_logger("tenantserve.sync")


def _read(state: AppState) -> tuple[int, str | None]:
    with Session(state.engine) as session:
        control = read_control(session)
        return control.auth_epoch, control.active_model_version


async def poll_changes(state: AppState, *, initial_epoch: int) -> None:
    epoch = initial_epoch
    refused_version: str | None = None  # a version that failed to load: said once, not 4x/s
    interval = state.settings.state_poll_interval_ms / 1000
    while True:
        await asyncio.sleep(interval)
        try:
            new_epoch, version = await asyncio.to_thread(_read, state)
        except SQLAlchemyError as exc:
            if state.database_ok:
                log.warning("database_unreachable", error=type(exc).__name__)
            state.database_ok = False
            continue
        if not state.database_ok:
            log.warning("database_reachable_again")
            state.database_ok = True
        if new_epoch != epoch:
            state.keys.clear()
            epoch = new_epoch
        if version and version not in (state.models.current.version, refused_version):
            try:
                await state.models.activate(version)
                log.info("model_activated", model_version=version)
            except (ModelError, OSError) as exc:
                refused_version = version
                log.error("model_activation_failed", model_version=version, error=str(exc))
