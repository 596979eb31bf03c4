"""One tenantserve serving the logistic regression to a provisioned tenant, warmed up: what the
one-server tools (`perf.profile`, `perf.threads`) load and look into.

Fresh SQLite and model dir in a scratch folder, the Redis limiter (db 14) when Redis answers,
8 keys limited to 1,000,000,000 a minute (the limiter runs on every request, refuses none).
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from perf import provision, servers
from perf.bench import IRIS
from perf.loadgen import Target, run_load


@contextmanager
def logreg_server(
    *, workers: int, connections: int, env: Mapping[str, str] | None = None
) -> Iterator[tuple[servers.Server, Target]]:
    """The server, stopped on leaving, and its `/v1/predict` target after 2 s of warm-up at
    `connections`; `env` adds settings (`TENANTSERVE_…`)."""
    scratch = Path(tempfile.mkdtemp(prefix="tenantserve-served-"))
    admin = ("perf-admin", secrets.token_urlsafe(24))
    limiter = "redis://127.0.0.1:6379/14" if servers.redis_answers() else "memory://"
    settings = servers.tenantserve_env(
        port=servers.free_port(),
        workers=workers,
        database_url=f"sqlite:///{scratch / 'served.db'}",
        limiter_uri=limiter,
        model_dir=scratch / "models",
        admin=admin,
    )
    settings.update(TENANTSERVE_MODEL_VERSION="v2-logreg", **(env or {}))
    server = servers.start_tenantserve(settings, log_path=scratch / "server.log", cwd=scratch)
    try:
        _, keys = provision.provision(
            server.url, username=admin[0], password=admin[1], tenant="served",
            keys=8, rate_limit="1000000000/minute",
        )  # fmt: skip
        target = Target(server.port, "/v1/predict", json.dumps(IRIS).encode(), keys)
        run_load(target, connections=connections, seconds=2)
        yield server, target
    finally:
        servers.stop(server)


def py_spy() -> str | None:
    """The py-spy of this virtualenv (a dev dependency), else one on the PATH."""
    return shutil.which("py-spy", path=str(servers.BIN)) or shutil.which("py-spy")
