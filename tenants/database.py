"""Engines, the unit of work, and schema migrations (Alembic; `serve` and `db upgrade`).

NOTE: Alembic is imported only when a schema needs upgrading. Every worker checks the schema as
it starts, and finds it current on every start but a new version's first; Alembic (with Mako)
would be ~11 MB of each worker's memory and ~130 ms of its start for that check alone. The
check compares the database's `alembic_version` with `SCHEMA_HEAD`, which
`tests/test_migrations.py` holds equal to the newest migration's revision.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlmodel import Session

if TYPE_CHECKING:
    from alembic.config import Config

_MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA_HEAD = "0004"
"""The newest migration's revision: what a current database's `alembic_version` holds."""
_PG_MIGRATION_LOCK = 727_001  # any constant: one advisory lock for schema upgrades


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers and the usage writer work side by side across workers.
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns, as on PostgreSQL. Under NORMAL a power
            # loss can undo commits the WAL has not checkpointed yet, and by then the usage
            # journal has deleted those records' segment: they would be gone from both.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=5,
        connect_args={"connect_timeout": 3},
    )


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back when it raises.

    The only place that commits: repositories flush (to see conflicts early) but never commit,
    so a change and its audit event always land together or not at all.
    """
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


def _alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def schema_is_current(engine: Engine) -> bool:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        stored = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
        return list(stored) == [SCHEMA_HEAD]


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise upgrades when several workers or instances start together."""
    url = make_url(str(engine.url))
    if url.get_backend_name() == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                connection.commit()
        return
    lock_path = Path(f"{url.database or 'memory'}.migrate.lock")
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it already is)."""
    if schema_is_current(engine):
        return
    from alembic import command

    with _migration_lock(engine), engine.begin() as connection:
        config = _alembic_config(str(engine.url))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
