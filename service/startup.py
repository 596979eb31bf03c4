"""What a server does once before it serves: the platform admin, and the version to start on.

Apart from `service.main` so that the command line reaches it without importing the web app:
the supervisor of a multi-worker server, and every operator command, start that much sooner.
"""

from __future__ import annotations

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from auth.passwords import PasswordHasher
from service.config import Settings
from service.serving.registry import ModelError, newest_version, read_manifest
from tenants.database import unit_of_work
from tenants.repository import find_user, read_control
from tenants.tables import User

log = structlog.get_logger("tenantserve")


def ensure_bootstrap_admin(engine: Engine, settings: Settings, passwords: PasswordHasher) -> None:
    """Create the environment's platform admin once; safe when several workers race."""
    username, password = settings.bootstrap_admin_username, settings.bootstrap_admin_password
    if not username or password is None:
        return
    try:
        with unit_of_work(engine) as session:
            if find_user(session, username) is not None:
                return
            session.add(
                User(username=username, password_hash=passwords.hash(password.get_secret_value()),
                     role="admin", tenant_id=None)
            )  # fmt: skip
        log.info("bootstrap_admin_created", username=username)
    except IntegrityError:
        pass  # another worker created it first


def startup_version(engine: Engine, settings: Settings) -> str:
    """The version to serve (activated through the API, else configured, else newest)."""
    with unit_of_work(engine) as session:
        control = read_control(session)
    for candidate in (control.active_model_version, settings.model_version):
        if candidate:
            try:
                read_manifest(settings.model_dir, candidate)
                return candidate
            except ModelError:
                log.error("model_version_missing", model_version=candidate)
    return newest_version(settings.model_dir)
