"""Start and stop the servers that the benchmarks measure: on 127.0.0.1 only, bounded in time.

Each server runs in its own session so that a last-resort kill reaches its workers too; the normal
stop is SIGTERM and a wait, which is also what the "no usage record lost" check relies on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

LOOPBACK = "127.0.0.1"
BIN = Path(
    sys.executable
).parent  # the virtualenv's bin: tenantserve and uvicorn live beside python


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def redis_answers(host: str = LOOPBACK, port: int = 6379) -> bool:
    """A raw PING: the bench must not fail, only fall back to memory://, when Redis is absent."""
    try:
        with socket.create_connection((host, port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start(
    name: str,
    command: list[str],
    *,
    port: int,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ready_within: float = 180.0,
    probe: str = "/health",
    workers: int = 1,
) -> Server:
    """Start `command` and wait until all its `workers` have started and `GET probe` answers 200;
    raises (and stops it) if not.

    A load that starts before the last worker listens opens every connection to the others.
    Several workers are counted by their start-up lines, which need log level INFO.
    """
    log_file = log_path.open("ab")
    log_start = log_file.tell()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    server = Server(name, process, port, log_path, log_file)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop(server)
            raise RuntimeError(f"{name} exited with {process.returncode}: see {log_path}")
        all_started = workers == 1 or _workers_started(log_path, log_start) >= workers
        try:
            if all_started and httpx.get(f"{server.url}{probe}", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    stop(server)
    raise RuntimeError(f"{name} did not answer {probe} within {ready_within:.0f} s: see {log_path}")


def _workers_started(log_path: Path, since: int) -> int:
    """uvicorn logs this line once per worker, in our JSON log and in its own plain one alike."""
    with log_path.open("rb") as log:
        log.seek(since)
        return log.read().count(b"Application startup complete")


def stop(server: Server, *, grace: float = 30.0) -> bool:
    """SIGTERM and wait; True when it exited by itself within `grace`, False when it was killed."""
    process = server.process
    clean = True
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            clean = False
    if process.poll() is None:
        # Last resort, and only the session this script created: its workers must not outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    server.log_file.close()
    return clean


def tenantserve_env(
    *,
    port: int,
    workers: int,
    database_url: str,
    limiter_uri: str,
    model_dir: Path,
    admin: tuple[str, str],
) -> dict[str, str]:
    """The environment for `tenantserve serve`, free of any TENANTSERVE_* of the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSERVE_")}
    env.update(
        TENANTSERVE_HOST=LOOPBACK,
        TENANTSERVE_PORT=str(port),
        TENANTSERVE_WORKERS=str(workers),
        TENANTSERVE_DATABASE_URL=database_url,
        TENANTSERVE_RATE_LIMIT_STORAGE_URI=limiter_uri,
        TENANTSERVE_MODEL_DIR=str(model_dir),
        TENANTSERVE_BOOTSTRAP_ADMIN_USERNAME=admin[0],
        TENANTSERVE_BOOTSTRAP_ADMIN_PASSWORD=admin[1],
        TENANTSERVE_LOG_FORMAT="json",
        # Each tool run signs in, and compare's rounds start two servers a round: the default
        # 10 sign-ins a minute (in a Redis that outlives the servers) would refuse the admin.
        TENANTSERVE_SIGNIN_RATE_LIMIT="100000/minute",
        TENANTSERVE_SIGNIN_ADDRESS_RATE_LIMIT="100000/minute",
    )
    return env


def start_tenantserve(
    env: Mapping[str, str], *, log_path: Path, cwd: Path, probe: str = "/health"
) -> Server:
    # cwd is a scratch folder: a developer's .env in the project must not change the figures.
    return start(
        "tenantserve",
        [str(BIN / "tenantserve"), "serve"],
        port=int(env["TENANTSERVE_PORT"]),
        log_path=log_path,
        env=env,
        cwd=cwd,
        probe=probe,
        workers=int(env["TENANTSERVE_WORKERS"]),
    )


def fresh_postgres_database(server_url: str, name: str) -> str:
    """Drop and create database `name` on the server of `server_url`; returns its SQLAlchemy URL.

    A database of its own, so that the tests' database (`test`) is never touched.
    """
    url = make_url(server_url)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (a server's workers and helpers), from /proc."""
    return _tree(pid)[1:]


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (the uvicorn workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_rss_kib(pid: int) -> int:
    """Resident memory of `pid` and all its descendants, in KiB."""
    total = 0
    for member in _tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def tree_cpu_total(pid: int) -> float:
    """CPU time (user + system) used so far by `pid` and its live descendants together.

    Unlike requests/s, CPU per request hardly moves when other work shares the cores.
    """
    return sum(tree_cpu_seconds(pid).values())


def cpu_seconds_of(command: str) -> float:
    """CPU time (user + system) used so far by every process named `command` (`redis-server`)."""
    total = 0.0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == command:
                total += _cpu_seconds(int(comm.parent.name)) or 0.0
        except OSError:
            continue
    return total


def machine_idle_seconds() -> tuple[float, float]:
    """The machine's idle and total CPU time so far, every core's, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return idle / os.sysconf("SC_CLK_TCK"), sum(fields[:8]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time (user + system) used so far by `pid` and by each of its live descendants."""
    seconds = {}
    for member in _tree(pid):
        used = _cpu_seconds(member)
        if used is not None:
            seconds[member] = used
    return seconds


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) used so far by `pid` alone; None once it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")
