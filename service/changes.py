"""Each worker's view of changes made by any worker or instance, within a fraction of a second.

The `PlatformControl` row is the truth: a changed auth epoch clears the key cache (revocations,
rotations, suspensions, limit changes, pins) and loads the versions tenants are pinned to; a
changed active version or rollout is loaded and swapped in. On PostgreSQL every change to the
row is also announced (`NOTIFY`): one `LISTEN` connection per worker wakes the reader at once,
and a slow safety poll (`state_safety_poll_s`) stays. On SQLite, or while that connection is
down (said once in the log, retried with backoff), the row is polled every
`state_poll_interval_ms`. No request ever waits for this.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from service.resources import Resources
from service.serving.registry import ModelError
from tenants import change_feed
from tenants.database import unit_of_work
from tenants.repository import ControlSnapshot, control_snapshot, pinned_versions
from tenants.rollout import PlatformVersions

log = structlog.get_logger("tenantserve.changes")


def _read(engine: Engine) -> ControlSnapshot:
    with engine.connect() as connection:
        return control_snapshot(connection)


def _read_pins(engine: Engine) -> set[str]:
    with unit_of_work(engine) as session:
        return pinned_versions(session)


async def _load_pins(resources: Resources) -> None:
    """Every version a tenant is pinned to, loaded before its first request needs it."""
    for version in sorted(await asyncio.to_thread(_read_pins, resources.engine)):
        with suppress(ModelError, OSError):  # recorded in `refused`, shown on /ready
            await resources.models.preload(version)


@dataclass
class _Listener:
    """Whether this worker hears the database's notifications right now."""

    live: bool = False


_RECONNECT_FIRST_S = 0.5
_RECONNECT_MAX_S = 30.0


async def _listen(resources: Resources, wake: asyncio.Event, listener: _Listener) -> None:
    backoff = _RECONNECT_FIRST_S
    said_down = False
    while True:
        try:
            async for _ in change_feed.notifications(resources.engine):
                if not listener.live:
                    listener.live, backoff = True, _RECONNECT_FIRST_S
                    if said_down:
                        log.info("change_listener_connected")
                    said_down = False
                wake.set()
        except change_feed.FeedLost as lost:
            if not said_down:
                log.warning("change_listener_down", error=str(lost),
                            fallback_poll_ms=resources.settings.state_poll_interval_ms)  # fmt: skip
                said_down = True
        listener.live = False
        await asyncio.sleep(backoff)
        backoff = min(2 * backoff, _RECONNECT_MAX_S)


async def watch_changes(resources: Resources) -> None:
    wake = asyncio.Event()
    listener = _Listener()
    listening = None
    if change_feed.pushes_changes(resources.engine):
        listening = asyncio.create_task(_listen(resources, wake, listener), name="change-listener")
    try:
        await _follow(resources, wake, listener)
    finally:
        if listening is not None:
            listening.cancel()
            with suppress(asyncio.CancelledError):
                await listening


async def _follow(resources: Resources, wake: asyncio.Event, listener: _Listener) -> None:
    epoch: int | None = None  # the first look applies everything
    # What the row said last time: only a change of the row is applied. (Comparing with what
    # this worker serves would undo its own activation when a read lands before that commit.)
    seen: tuple[str | None, str | None, int] | None = None
    settings = resources.settings
    models = resources.models
    while True:
        if epoch is not None:
            interval = (
                settings.state_safety_poll_s if listener.live
                else settings.state_poll_interval_ms / 1000
            )  # fmt: skip
            # NOTE: not `asyncio.wait_for`: on Python 3.11 a cancellation that arrives as the
            # wait ends is lost there, and a lifespan awaiting this task would wait for ever.
            with suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await wake.wait()
        wake.clear()  # before the read: a change announced during it wakes the next one
        async with models.switching:  # see `ModelHolder.switching`
            try:
                control = await asyncio.to_thread(_read, resources.engine)
                if control.auth_epoch != epoch:
                    # Revocations, suspensions, limit changes and pins: keys are read afresh.
                    resources.keys.clear()
                    epoch = control.auth_epoch
                    await _load_pins(resources)
            except SQLAlchemyError as exc:
                if resources.database_ok:
                    log.warning("database_unreachable", error=type(exc).__name__)
                resources.database_ok = False
                continue
            if not resources.database_ok:
                log.warning("database_reachable_again")
                resources.database_ok = True
            versions = (
                control.active_model_version,
                control.rollout_version,
                control.rollout_percent,
            )
            if versions == seen:
                continue
            seen = versions
            active, rollout, percent = versions
            platform = PlatformVersions(active or models.platform.active, rollout, percent)
            try:
                await models.set_platform(platform)  # a failed version is said once, not 4x/s
                log.info("model_versions_changed", model_version=platform.active,
                         rollout_version=rollout, rollout_percent=percent)  # fmt: skip
            except (ModelError, OSError) as exc:
                log.error("model_activation_failed", model_version=platform.active,
                          rollout_version=rollout, error=str(exc))  # fmt: skip
