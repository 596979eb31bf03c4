"""Schema migrations: a database at an older revision is brought to the newest as the service
starts, and a worker that finds its schema current has no use for Alembic and never imports it
(~11 MB of every worker's memory otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import SQLModel

from service.config import Settings
from service.main import create_app
from tenants.database import (
    SCHEMA_HEAD,
    _alembic_config,
    make_engine,
    schema_is_current,
    upgrade,
)
from tests.conftest import ROOT, _scratch_database


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of its own with no tables at all, on each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with _scratch_database() as url:
        yield url


def test_the_schema_head_is_the_newest_migration() -> None:
    config = _alembic_config("sqlite://")
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD


def test_the_migrations_build_exactly_the_tables_the_code_declares(empty_database: str) -> None:
    """Columns, types, nullability and indexes: a change to `tenants.tables` (in SQLModel's
    metadata once the app is imported) without its migration, or the other way round, fails
    here, on each kind of database."""
    engine = make_engine(empty_database)
    upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    engine.dispose()
    assert differences == []


def test_a_database_at_an_older_revision_is_upgraded_as_the_service_starts(
    empty_database: str, model_dir: Path, tmp_path: Path
) -> None:
    engine = make_engine(empty_database)
    with engine.begin() as connection:
        config = _alembic_config(empty_database)
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")  # a database the previous release left
    assert not schema_is_current(engine)
    settings = Settings(
        _env_file=None,
        database_url=empty_database,
        model_dir=model_dir,
        usage_journal_dir=tmp_path / "journal",
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 200
    assert schema_is_current(engine)
    with engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version == SCHEMA_HEAD
    engine.dispose()


_WORKER = """
import json, sys
from fastapi.testclient import TestClient
from service.config import Settings
from service.main import create_app

with TestClient(create_app(Settings(_env_file=None))) as client:
    ready = client.get("/ready").status_code
loaded = sorted({name.split(".")[0] for name in sys.modules} & {"alembic", "mako"})
print(json.dumps({"ready": ready, "loaded": loaded}))
"""


def test_a_worker_on_a_current_schema_never_imports_alembic(
    model_dir: Path, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'current.db'}"
    upgrade(make_engine(database))  # as `tenantserve serve` does before its workers start
    env = {key: value for key, value in os.environ.items() if not key.startswith("TENANTSERVE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        TENANTSERVE_DATABASE_URL=database,
        TENANTSERVE_MODEL_DIR=str(model_dir),
        TENANTSERVE_USAGE_JOURNAL_DIR=str(tmp_path / "journal"),
    )
    worker = subprocess.run(
        [sys.executable, "-c", _WORKER], env=env, capture_output=True, text=True, timeout=120
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert json.loads(worker.stdout.splitlines()[-1]) == {"ready": 200, "loaded": []}
