"""A sampling profile of one tenantserve worker under wrk: `python -m perf.profile`.

One worker (`tenantserve serve`, fresh SQLite database and model dir, Redis limiter db 14 when
Redis answers), `--connections` (32: a worker's share of the bench's) on `/v1/predict` with the
logistic regression; py-spy samples the worker for `--seconds` and writes folded stacks
(`flamegraph.pl` or speedscope read them).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from perf import provision, servers
from perf.loadgen import Target, run_load

IRIS = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    # The bench's 64 connections over its 2 workers: each worker's share.
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("perf/results/profile.folded"))
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy", path=str(servers.BIN)) or shutil.which("py-spy")
    if spy is None:
        parser.error("py-spy is not installed (it is a dev dependency: `make`)")
    scratch = Path(tempfile.mkdtemp(prefix="tenantserve-profile-"))
    admin = ("perf-admin", secrets.token_urlsafe(24))
    limiter = "redis://127.0.0.1:6379/14" if servers.redis_answers() else "memory://"
    database = f"sqlite:///{scratch / 'p.db'}"
    env = dict(
        servers.tenantserve_env(
            port=servers.free_port(),
            workers=1,
            database_url=database,
            limiter_uri=limiter,
            model_dir=scratch / "models",
            admin=admin,
        )
    )
    env["TENANTSERVE_MODEL_VERSION"] = "v2-logreg"
    server = servers.start_tenantserve(env, log_path=scratch / "server.log", cwd=scratch)
    try:
        _, keys = provision.provision(
            server.url, username=admin[0], password=admin[1], tenant="profile",
            keys=8, rate_limit="1000000000/minute", max_batch_size=1000,
        )  # fmt: skip
        target = Target(server.port, "/v1/predict", json.dumps(IRIS).encode(), keys)
        run_load(target, connections=args.connections, seconds=2)  # warm up
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = [spy, "record", "-p", str(server.process.pid), "-r", "200", "--nonblocking",
                   "-d", str(args.seconds), "-f", "raw", "-o", str(args.out)]  # fmt: skip
        cpu = servers.tree_cpu_total(server.process.pid)
        with subprocess.Popen(command) as sampler:
            result = run_load(target, connections=args.connections, seconds=args.seconds + 2)
            sampler.wait()
        cpu = servers.tree_cpu_total(server.process.pid) - cpu
        print(
            f"{result.requests / result.seconds:.0f} requests/s, p99 {result.p99_ms:.1f} ms, "
            f"{cpu * 1e6 / result.requests:.0f} µs of server CPU a request (sampler included)"
        )
        print(f"folded stacks in {args.out}")
    finally:
        servers.stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
