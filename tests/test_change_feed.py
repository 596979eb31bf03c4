"""Admin changes pushed to every worker by PostgreSQL `NOTIFY`, and the poll when that is down."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psycopg
from sqlalchemy.engine import make_url

from tests.conftest import bearer, issue_key, live_server, new_customer, wait_for
from tests.test_keys import predict, spread


def revoke(http: httpx.Client, key_id: str, token: str) -> float:
    response = http.post(f"/v1/admin/keys/{key_id}/revoke", headers=bearer(token))
    assert response.status_code == 200, response.text
    return time.monotonic()


def refused_everywhere_within_a_second(url: str, key: str, revoked_at: float) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        wait_for(lambda: predict(http, key).status_code == 401, within=1.0, since=revoked_at)
    time.sleep(max(0.0, revoked_at + 1.0 - time.monotonic()))
    assert spread(url, key, 20) == [401] * 20  # on new connections: every worker refuses it


def test_changes_are_pushed_and_polled_while_the_listener_is_down(
    postgresql_url: str, model_dir: Path, tmp_path: Path
) -> None:
    env = {
        "TENANTSERVE_DATABASE_URL": postgresql_url,
        "TENANTSERVE_MODEL_DIR": str(model_dir),
        # A safety poll slower than the test: whatever arrives within a second was pushed.
        "TENANTSERVE_STATE_SAFETY_POLL_S": "60",
    }
    with live_server(env, tmp_path / "server.log", workers=2) as server, server.client() as http:
        customer = new_customer(http)
        first = customer.key
        second = issue_key(http, customer.token, customer.tenant["id"], name="second")
        assert spread(server.url, first["key"], 20) == [200] * 20
        assert spread(server.url, second["key"], 20) == [200] * 20

        refused_everywhere_within_a_second(
            server.url, first["key"], revoke(http, first["id"], customer.token)
        )

        # The database ends both workers' listening connections, as a failover would.
        conninfo = make_url(postgresql_url).set(drivername="postgresql")
        with psycopg.connect(conninfo.render_as_string(hide_password=False)) as database:
            ended = database.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query = 'LISTEN tenantserve_control'"
            ).fetchone()
        assert ended == (2,)
        wait_for(lambda: server.output().count('"change_listener_down"') == 2, within=5.0)

        refused_everywhere_within_a_second(
            server.url, second["key"], revoke(http, second["id"], customer.token)
        )
        wait_for(lambda: server.output().count('"change_listener_connected"') == 2, within=10.0)
        assert server.output().count('"change_listener_down"') == 2  # once per outage
