"""A sampling profile of one tenantserve worker under wrk: `python -m perf.profile`.

One worker (`tenantserve serve`, fresh SQLite database and model dir, Redis limiter db 14 when
Redis answers), `--connections` (32: a worker's share of the bench's) on `/v1/predict` with the
logistic regression; py-spy samples the worker for `--seconds` and writes folded stacks
(`flamegraph.pl` or speedscope read them).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from perf import served, servers
from perf.loadgen import run_load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    # The bench's 64 connections over its 2 workers: each worker's share.
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("perf/results/profile.folded"))
    args = parser.parse_args(argv)
    spy = served.py_spy()
    if spy is None:
        parser.error("py-spy is not installed (it is a dev dependency: `make`)")
    with served.logreg_server(workers=1, connections=args.connections) as (server, target):
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
