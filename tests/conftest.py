"""Real parts only: SQLite files, a PostgreSQL database, Redis, trained models, real servers.

On a laptop without PostgreSQL or Redis the tests that need them skip with a reason; in CI
(`CI=true`) they fail instead, so a missing service can never pass for green.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.config import Settings
from service.main import create_app
from service.serving.training import ensure_default_versions
from tenants.database import make_engine, upgrade

PG_ADMIN_DSN = os.environ.get(
    "TENANTSERVE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


def _worker_redis_url(base: str, worker: str) -> str:
    """The Redis database of this xdist worker (`gw0`, `gw1`, …): counting down from the base
    one, past 13 and 14 (kept for benchmarks); without xdist, the base itself."""
    stem, _, number = base.rpartition("/")
    if not worker.startswith("gw") or not number.isdigit():
        return base
    candidates = [n for n in range(int(number), -1, -1) if n == int(number) or n not in (13, 14)]
    if int(worker[2:]) >= len(candidates):
        raise RuntimeError(f"no Redis database left below {base} for xdist worker {worker}")
    return f"{stem}/{candidates[int(worker[2:])]}"


REDIS_URL = _worker_redis_url(
    os.environ.get("TENANTSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
    os.environ.get("PYTEST_XDIST_WORKER", ""),
)
ADMIN_USERNAME = "platform-admin"
ADMIN_PASSWORD = "correct horse battery staple"
IN_CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(__file__).resolve().parent.parent
TABLES = ("usage_records", "audit_events", "api_keys", "users", "tenants")
# argon2 at its cheapest: the tests check what passwords do, not how slowly they hash.
CHEAP_PASSWORD_HASHES = {
    "password_hash_memory_kib": 8,
    "password_hash_time_cost": 1,
    "password_hash_parallelism": 1,
}
FEATURES = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


# The modules that take longest (server restarts, SIGKILLs, a cluster), slowest first: they
# start first, so none is left running alone on one xdist worker at the end.
SLOWEST_MODULES = (
    "test_durability", "test_scale_out", "test_keys", "test_model_versions", "test_schemathesis",
    "test_rate_limits", "test_registry", "test_usage", "test_drain", "test_abuse", "test_logging",
)  # fmt: skip
# Modules whose tests share no fixture of module scope: under `--dist loadfile` their tests
# still go to the workers one by one (the longest ones, each on a worker of its own).
SPREAD_MODULES = (
    "test_durability", "test_keys", "test_model_versions", "test_usage", "test_drain",
    "test_abuse", "test_idempotency", "test_cli",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        return SLOWEST_MODULES.index(name) if name in SLOWEST_MODULES else len(SLOWEST_MODULES)

    items.sort(key=rank)  # stable: within a module, and for the rest, the order stays


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` (as `make test` runs it), but the SPREAD_MODULES a test at a time;
    every other `--dist` as xdist has it."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if Path(module).stem in SPREAD_MODULES else module

    return Scheduling(config, log)


def unavailable(what: str) -> None:
    """Fail in CI, skip elsewhere: a test that needs a real service never passes without it."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but unreachable")
    pytest.skip(f"{what} unreachable on this machine")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    ensure_default_versions(directory)
    return directory


@contextmanager
def _scratch_database() -> Iterator[str]:
    """A new, empty PostgreSQL database until the block ends."""
    name = f"tenantserve_test_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        unavailable("PostgreSQL")
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_DSN.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0]
    try:
        yield f"{url}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    with _scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'tenantserve.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs on both databases, starting from empty tables."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as connection:
        for table in TABLES:
            connection.execute(text(f"DELETE FROM {table}"))
        connection.execute(
            text("UPDATE control_state SET auth_epoch = 0, active_model_version = NULL")
        )
    engine.dispose()
    return url


@pytest.fixture
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.flushdb()
    except redis.RedisError:
        unavailable("Redis")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def make_settings(database_url: str, model_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "env": "development",
            "database_url": database_url,
            "model_dir": model_dir,
            "bootstrap_admin_username": ADMIN_USERNAME,
            "bootstrap_admin_password": ADMIN_PASSWORD,
            "usage_flush_interval_ms": 50,
            "usage_journal_dir": tmp_path / "journal",
            "state_poll_interval_ms": 100,
            "signin_rate_limit": "1000/minute",
            "signin_address_rate_limit": "10000/minute",
            **CHEAP_PASSWORD_HASHES,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """The real app, lifespan and all, over httpx; on both databases."""
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as test_client:
        yield test_client


# Helpers that act as the platform's users would


def admin_token(
    client: httpx.Client | TestClient,
    username: str = ADMIN_USERNAME,
    password: str = ADMIN_PASSWORD,
) -> str:
    response = client.post("/v1/auth/token", data={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_tenant(client: httpx.Client | TestClient, token: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("name", f"tenant-{uuid.uuid4().hex[:8]}")
    response = client.post("/v1/admin/tenants", json=fields, headers=bearer(token))
    assert response.status_code == 201, response.text
    return dict(response.json())


def issue_key(
    client: httpx.Client | TestClient, token: str, tenant_id: str, **fields: Any
) -> dict[str, Any]:
    fields.setdefault("name", "test key")
    response = client.post(
        f"/v1/admin/tenants/{tenant_id}/keys", json=fields, headers=bearer(token)
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


@dataclass
class Customer:
    token: str
    tenant: dict[str, Any]
    key: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key["key"]}


def new_customer(
    client: httpx.Client | TestClient,
    token: str | None = None,
    *,
    tenant: dict[str, Any] | None = None,
    **key_fields: Any,
) -> Customer:
    """A tenant (unless given) with one fresh key."""
    token = token or admin_token(client)
    tenant = tenant or create_tenant(client, token)
    return Customer(token, tenant, issue_key(client, token, tenant["id"], **key_fields))


# Real servers in subprocesses, for what only a real process shows (workers, signals, stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM, as an orchestrator would, and wait for the graceful exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Whatever the supervisor left behind (a worker of a killed server) goes with it.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return int(self.process.returncode)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def live_server(
    env: dict[str, str],
    log_path: Path,
    *,
    workers: int = 1,
    command: Sequence[str] = ("-m", "service", "serve"),
    port: int | None = None,
    stderr_path: Path | None = None,
) -> Iterator[LiveServer]:
    """`tenantserve serve` with these settings on a loopback port (by default a free one),
    until the block ends.

    Its stdout goes to `log_path`, and so does its stderr unless `stderr_path` is given.
    """
    port = port or free_port()
    full_env = {
        key: value for key, value in os.environ.items() if not key.startswith("TENANTSERVE_")
    }
    full_env.update(
        {
            "TENANTSERVE_HOST": "127.0.0.1",
            "TENANTSERVE_PORT": str(port),
            "TENANTSERVE_WORKERS": str(workers),
            "TENANTSERVE_ENV": "development",
            "PYTHONPATH": str(ROOT),
            "TENANTSERVE_BOOTSTRAP_ADMIN_USERNAME": ADMIN_USERNAME,
            "TENANTSERVE_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "TENANTSERVE_USAGE_FLUSH_INTERVAL_MS": "50",
            "TENANTSERVE_STATE_POLL_INTERVAL_MS": "100",
            "TENANTSERVE_SIGNIN_RATE_LIMIT": "1000/minute",
            "TENANTSERVE_SIGNIN_ADDRESS_RATE_LIMIT": "10000/minute",
            **{f"TENANTSERVE_{name.upper()}": str(v) for name, v in CHEAP_PASSWORD_HASHES.items()},
            **env,
        }
    )
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with ExitStack() as files:
        log_file = files.enter_context(log_path.open("wb"))
        errors = files.enter_context(stderr_path.open("wb")) if stderr_path else subprocess.STDOUT
        process = subprocess.Popen(
            [sys.executable, *command],
            cwd=log_path.parent,
            env=full_env,
            stdout=log_file,
            stderr=errors,
            start_new_session=True,  # its own process group: `stop` can end every worker
        )
    server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        _wait_until_healthy(server, workers)
        yield server
    finally:
        server.stop()


def _wait_until_healthy(server: LiveServer, workers: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    started = 0
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.output()[-3000:]}")
        started = server.output().count('"event":"started"')
        if started >= workers:
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    raise RuntimeError(
        f"server not healthy ({started} workers started):\n{server.output()[-3000:]}"
    )


def server_env(database_url: str, model_dir: Path, **settings: str) -> dict[str, str]:
    """A live server's environment: these settings, and the session's trained models."""
    env = {"TENANTSERVE_DATABASE_URL": database_url, "TENANTSERVE_MODEL_DIR": str(model_dir)}
    env.update({f"TENANTSERVE_{name.upper()}": value for name, value in settings.items()})
    return env


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[str]:
    """Redis for the live servers that outlive one test: this session's database, emptied at
    the start and at the end.

    NOTE: the `redis_url` fixture empties the same database at the start of each test that
    takes it; the servers here lose only the windows of tests already over, whose tenants and
    keys no later test uses.
    """
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.flushdb()
    except redis.RedisError:
        unavailable("Redis")
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def shared_postgresql_url() -> Iterator[str]:
    """A PostgreSQL database of its own for `two_workers`: `database_url` empties the other
    one before each test, which would take the live server's admin and tenants with it."""
    with _scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def two_workers(
    shared_postgresql_url: str,
    model_dir: Path,
    shared_redis: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """Two uvicorn workers on PostgreSQL and Redis, started once for every test that needs no
    more than that (limits, quotas, revocation, pins across workers); each test keeps to
    tenants and keys of its own.

    Its log holds every such test's lines: a test that reads it looks at what came after its
    own start, or at what names its own request ids or keys.
    """
    env = server_env(
        shared_postgresql_url, model_dir, rate_limit_storage_uri=shared_redis,
        # Revocation tests send dozens of revoked keys from this one address; the per-address
        # failure limit (test_abuse) must not carry over into the next test's requests.
        auth_failure_limit="100000/minute",
    )  # fmt: skip
    log = tmp_path_factory.mktemp("two-workers") / "server.log"
    with live_server(env, log, workers=2) as server:
        yield server


# ---------------------------------------------------------------------------------------------
# Shared by the key, staff-auth, tenant-scoping, route-security and CLI tests

STAFF_PASSWORD = "another long staff password"


def new_staff(
    client: httpx.Client | TestClient, token: str, *, role: str, tenant_id: str | None = None
) -> tuple[dict[str, Any], str]:
    """A staff user created by the admin holding `token`, and a fresh token of the new user's."""
    username = f"{role}-{uuid.uuid4().hex[:8]}"
    fields = {"username": username, "password": STAFF_PASSWORD, "role": role}
    response = client.post(
        "/v1/admin/users", json={**fields, "tenant_id": tenant_id}, headers=bearer(token)
    )
    assert response.status_code == 201, response.text
    return dict(response.json()), admin_token(client, username, STAFF_PASSWORD)


def audit_events(client: httpx.Client | TestClient, token: str) -> list[dict[str, Any]]:
    """The audit log as `token`'s holder may read it, newest first."""
    response = client.get("/v1/audit/events", params={"limit": 1000}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def wait_for(condition: Callable[[], bool], *, within: float, since: float | None = None) -> float:
    """Seconds from `since` (default: now) to the start of the first check that held.

    Fails the test when no check started within `within` seconds held.
    """
    started = time.monotonic() if since is None else since
    while True:
        attempt = time.monotonic()
        if condition():
            return attempt - started
        if attempt - started >= within:
            pytest.fail(f"not so {attempt - started:.2f} s later (allowed: {within} s)")
        time.sleep(0.02)


def api_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path template) of every API route of `app`, those behind `include_router` too.

    Since FastAPI 0.137 `app.routes` holds one opaque entry per included router, so a plain
    walk finds almost nothing and every "all routes" test would pass vacuously;
    `iter_route_contexts` resolves them, prefixes included.
    """
    from fastapi.routing import APIRoute, iter_route_contexts

    routes = {
        (method, str(context.path))
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
        for method in context.methods or ()
    }
    assert ("POST", "/v1/predict") in routes, f"route listing is broken: {sorted(routes)}"
    return routes


def stored_rows(database_url: str, sql: str, **params: Any) -> list[Any]:
    """Rows as the database holds them, for what no API shows (hashes, counts, raw audit rows)."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql), params).all())
    finally:
        engine.dispose()
