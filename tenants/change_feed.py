"""Telling every worker that the control row changed: PostgreSQL `NOTIFY`, heard by `LISTEN`.

The control row (`PlatformControl`) stays the truth; a notification only says "read it now".
`announce` runs inside the changing transaction, so PostgreSQL delivers it at commit and never
for a rollback. SQLite has no such channel: there the row is polled (`service.changes`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
from sqlalchemy import Engine, text
from sqlmodel import Session

CHANNEL = "tenantserve_control"


def pushes_changes(engine: Engine) -> bool:
    """Whether this database can push changes (PostgreSQL) or must be polled (SQLite)."""
    return engine.dialect.name == "postgresql"


def announce(session: Session) -> None:
    """Queue a notification for when this session's transaction commits."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


class FeedLost(Exception):
    """The listening connection failed or could not be made; the message names the error."""


async def notifications(engine: Engine) -> AsyncIterator[None]:
    """One item when listening starts, then one per notification, until the connection fails.

    A failure raises `FeedLost`; the caller reconnects. The first item lets the caller read the
    row at once: a change made while nobody listened is not missed.
    """
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        # Keepalives notice a silently dead peer, which would otherwise be waited on forever.
        async with await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, connect_timeout=3,
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
        ) as connection:  # fmt: skip
            await connection.execute(f"LISTEN {CHANNEL}")
            yield None
            async for _ in connection.notifies():
                yield None
    except (psycopg.Error, OSError) as exc:
        raise FeedLost(type(exc).__name__) from None
    raise FeedLost("connection closed")
