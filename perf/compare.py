"""`python -m perf.compare`: the app's CPU a request against another revision's, both at once.

On this shared 2-core VM one `perf.app_cost` run moves ±10% from one minute to the next, more
than most changes are worth. Two runs at the same time, one per checkout, share whatever the
machine is doing, and their ratio held within ±3% in the runs of `perf/README.md`. The other
revision is checked out into a temporary git worktree and run with this checkout's virtualenv,
so compare revisions with the same lock file.

    .venv/bin/python -m perf.compare                      # working tree against HEAD
    .venv/bin/python -m perf.compare --base fa0ee77 --rounds 4 -- --version v1-forest
    .venv/bin/python -m perf.compare --served             # real servers under wrk instead

`--served` measures what `app_cost` leaves out (uvicorn, the network, requests that arrive
spread out instead of all at once): each round starts `tenantserve serve` from both checkouts
(one worker, SQLite, the Redis limiter when Redis answers), loads both at the same time, and
compares their server CPU a request.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from perf import provision, servers
from perf.bench import IRIS
from perf.loadgen import Target, run_load

ROOT = Path(__file__).resolve().parent.parent
_FIGURE = re.compile(r"([0-9.]+) µs of CPU a request")


def _start(checkout: Path, app_cost_args: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "perf.app_cost", *app_cost_args]
    return subprocess.Popen(command, cwd=checkout, stderr=subprocess.PIPE, text=True)


def _figure(process: subprocess.Popen[str]) -> float:
    _, stderr = process.communicate()
    found = _FIGURE.search(stderr)
    if process.returncode != 0 or found is None:
        raise SystemExit(f"perf.app_cost failed:\n{stderr[-2000:]}")
    return float(found.group(1))


def _app_cost_round(base: Path, app_cost_args: list[str]) -> tuple[float, float]:
    runs = [_start(base, app_cost_args), _start(ROOT, app_cost_args)]
    before, after = (_figure(run) for run in runs)
    return before, after


def _served_round(base: Path, connections: int, seconds: float) -> tuple[float, float, float]:
    """Both checkouts' server CPU a request, and how many requests this one answered against
    the base (they share the cores: where waits, not CPU, hold requests up, this moves too)."""
    with tempfile.TemporaryDirectory(prefix="tenantserve-compare-served-") as folder:
        scratch = Path(folder)
        started = [
            _serve(checkout, scratch / name) for checkout, name in ((base, "base"), (ROOT, "this"))
        ]
        try:
            targets = [_provisioned(server, admin) for server, admin in started]
            cpu = [0.0, 0.0]
            requests = [0, 0]

            def measure(index: int) -> None:
                server = started[index][0]
                before = servers.tree_cpu_total(server.process.pid)
                result = run_load(targets[index], connections=connections, seconds=seconds)
                cpu[index] = servers.tree_cpu_total(server.process.pid) - before
                requests[index] = result.requests

            loads = [threading.Thread(target=measure, args=(index,)) for index in (0, 1)]
            for load in loads:
                load.start()
            for load in loads:
                load.join()
        finally:
            for server, _ in started:
                servers.stop(server)
    before, after = (cpu[i] * 1e6 / requests[i] if requests[i] else float("nan") for i in (0, 1))
    return before, after, requests[1] / requests[0] if requests[0] else float("nan")


def _serve(checkout: Path, scratch: Path) -> tuple[servers.Server, tuple[str, str]]:
    """`tenantserve serve` of `checkout`, one worker, in a folder of its own."""
    scratch.mkdir()
    admin = ("perf-admin", secrets.token_urlsafe(24))
    limiter = "redis://127.0.0.1:6379/14" if servers.redis_answers() else "memory://"
    env = servers.tenantserve_env(
        port=servers.free_port(), workers=1, database_url=f"sqlite:///{scratch / 'c.db'}",
        limiter_uri=limiter, model_dir=scratch / "models", admin=admin,
    )  # fmt: skip
    env.update(PYTHONPATH=str(checkout), TENANTSERVE_MODEL_VERSION="v2-logreg")
    command = [sys.executable, "-m", "service", "serve"]
    port = int(env["TENANTSERVE_PORT"])
    log = scratch / "server.log"
    return servers.start(
        scratch.name, command, port=port, log_path=log, env=env, cwd=scratch
    ), admin


def _provisioned(server: servers.Server, admin: tuple[str, str]) -> Target:
    _, keys = provision.provision(
        server.url, username=admin[0], password=admin[1], tenant="compare",
        keys=8, rate_limit="1000000000/minute",
    )  # fmt: skip
    target = Target(server.port, "/v1/predict", json.dumps(IRIS).encode(), keys)
    run_load(target, connections=8, seconds=1)  # warm up
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.compare", description=__doc__)
    parser.add_argument("--base", default="HEAD", help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--served", action="store_true", help="real servers under wrk")
    parser.add_argument("--connections", type=int, default=32, help="with --served, each")
    parser.add_argument("--seconds", type=float, default=8.0, help="with --served")
    parser.add_argument("app_cost_args", nargs="*", help="after --: passed to perf.app_cost")
    args = parser.parse_args(argv)
    passed = args.app_cost_args or ["--requests", "30000", "--concurrency", "32"]
    with tempfile.TemporaryDirectory(prefix="tenantserve-compare-") as folder:
        base = Path(folder) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            ratios, answered = [], []
            for round_ in range(1, args.rounds + 1):
                line = ""
                if args.served:
                    before, after, more = _served_round(base, args.connections, args.seconds)
                    answered.append(more)
                    line = f", requests answered {more:.3f}"
                else:
                    before, after = _app_cost_round(base, passed)
                ratios.append(after / before)
                print(f"round {round_}: {args.base} {before:.1f} µs, this checkout {after:.1f} µs, "
                      f"ratio {after / before:.3f}{line}")  # fmt: skip
            print(f"median ratio {statistics.median(ratios):.3f} over {len(ratios)} rounds")
            if answered:
                print(f"median ratio of requests answered {statistics.median(answered):.3f}")
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)],
                cwd=ROOT, check=False, capture_output=True,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
