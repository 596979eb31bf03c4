"""Where a served prediction's CPU goes, thread by thread: `python -m perf.threads`.

A tenantserve server (`--workers`, fresh SQLite, Redis limiter db 14 when Redis answers) under
wrk on `/v1/predict` with the logistic regression, once per `--durability` given. For each,
every thread's CPU time from /proc, summed over the workers by the thread's Python name (read
by `py-spy dump`) and divided by the requests answered, with its context switches a request:
voluntary (it waited: for work, the GIL, the disk) and involuntary (the scheduler took the core).

Where `perf.profile` says which code runs, this says which thread pays, which a sampling
profile blurs: a wait for the GIL or for a thread hand-off is CPU the main thread spends around
the work, not in it (perf/README.md, "Session 9").
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

from perf import served, servers
from perf.loadgen import run_load

_THREAD = re.compile(r'Thread (\d+) \([^)]*\): "([^"]+)"')
_POOL_SUFFIX = re.compile(r"_\d+$")  # a pool's threads count as one: blocking_0, blocking_1 …


def _thread_counters(pid: int) -> dict[tuple[int, int], tuple[float, int, int]]:
    """(process, thread) → (CPU seconds, voluntary, involuntary context switches) so far."""
    found = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for member in servers.descendants(pid) or [pid]:
        for task in Path(f"/proc/{member}/task").glob("*"):
            try:
                stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
                status = (task / "status").read_text()
            except OSError:
                continue  # the thread ended while we looked
            switches = dict(
                line.split(":\t") for line in status.splitlines() if "ctxt_switches" in line
            )
            found[(member, int(task.name))] = (
                (int(stat[11]) + int(stat[12])) / ticks,
                int(switches["voluntary_ctxt_switches"]),
                int(switches["nonvoluntary_ctxt_switches"]),
            )
    return found


def _thread_names(spy: str, pid: int) -> dict[tuple[int, int], str]:
    names = {}
    for member in servers.descendants(pid) or [pid]:
        dump = subprocess.run([spy, "dump", "-p", str(member)], capture_output=True, text=True)
        for tid, name in _THREAD.findall(dump.stdout):
            names[(member, int(tid))] = _POOL_SUFFIX.sub("", name)
    return names


def _measure(args: argparse.Namespace, spy: str, durability: str) -> None:
    durable = {"TENANTSERVE_USAGE_DURABILITY": durability}
    with served.logreg_server(workers=args.workers, connections=args.connections, env=durable) as (
        server,
        target,
    ):
        before = _thread_counters(server.process.pid)
        idle_before, machine_before = servers.machine_idle_seconds()
        result = run_load(target, connections=args.connections, seconds=args.seconds)
        idle_after, machine_after = servers.machine_idle_seconds()
        after = _thread_counters(server.process.pid)
        names = _thread_names(spy, server.process.pid)
    # By name: CPU seconds, voluntary and involuntary switches.
    totals: dict[str, list[float]] = {}
    for thread, now in after.items():
        was = before.get(thread, (0.0, 0, 0))
        row = totals.setdefault(names.get(thread, "(not Python)"), [0.0, 0.0, 0.0])
        for i in range(3):
            row[i] += now[i] - was[i]
    per = 1 / max(result.requests, 1)
    print(
        f"\n{durability}: {result.rps:.0f} requests/s, p99 {result.p99_ms:.1f} ms, "
        f"{sum(row[0] for row in totals.values()) * 1e6 * per:.0f} µs of CPU a request, "
        f"the machine {(idle_after - idle_before) / (machine_after - machine_before):.2f} idle"
    )
    print(f"  {'thread':<24} {'µs/req':>7} {'waits/req':>9} {'preempted/req':>13}")
    for name, (cpu, voluntary, involuntary) in sorted(totals.items(), key=lambda i: -i[1][0]):
        if cpu * 1e6 * per >= 0.5:
            print(
                f"  {name:<24} {cpu * 1e6 * per:>7.1f} {voluntary * per:>9.2f} "
                f"{involuntary * per:>13.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.threads", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--durability", default="journal,written", help="comma-separated, one run each"
    )
    args = parser.parse_args(argv)
    spy = served.py_spy()
    if spy is None:
        parser.error("py-spy is not installed (it is a dev dependency: `make`)")
    for durability in args.durability.split(","):
        _measure(args, spy, durability)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
