"""Closed-loop HTTP load against 127.0.0.1: `wrk` when installed, else a small asyncio client.

Both keep N keep-alive connections busy for a fixed time, rotate the API keys request by request
and report the same figures, so `perf/bench.py` does not care which one ran.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Target:
    """One scenario's request: the same path and body, sent with each key in turn."""

    port: int
    path: str
    body: bytes
    keys: Sequence[str] = ()


@dataclass(frozen=True)
class LoadResult:
    requests: int  # responses received, whatever their status
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    # Requests the server may have handled without the generator counting a response (in flight
    # when the time ran out): the tolerance of the "no usage record lost" check.
    uncounted_at_most: int
    tool: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def run_load(target: Target, *, connections: int, seconds: float, tool: str = "auto") -> LoadResult:
    """Load `target` for `seconds`; `tool` is `wrk`, `python` or `auto` (wrk when on PATH)."""
    wrk = shutil.which("wrk")
    if tool == "wrk" or (tool == "auto" and wrk):
        if not wrk:
            raise RuntimeError("wrk is not on PATH (Debian package `wrk`)")
        return _run_wrk(wrk, target, connections=connections, seconds=seconds)
    return _run_python(target, connections=connections, seconds=seconds)


# --- wrk ------------------------------------------------------------------------------------------

# Requests are formatted once per key in init(): formatting in request() would cost Lua time per
# request. done() prints one machine-readable line; wrk's own summary is for people.
_LUA = """
local keys = {KEYS}
local body = [==[{BODY}]==]
local prepared = {}
local n = 0
init = function(args)
  for _, key in ipairs(keys) do
    local headers = {["Content-Type"] = "application/json", ["X-API-Key"] = key}
    prepared[#prepared + 1] = wrk.format("POST", "{PATH}", headers, body)
  end
end
request = function()
  n = n % #prepared + 1
  return prepared[n]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "TSBENCH requests=%d duration_us=%d p50_us=%d p99_us=%d status=%d sock=%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""
_RESULT = re.compile(
    r"TSBENCH requests=(\d+) duration_us=(\d+) p50_us=(\d+) p99_us=(\d+) status=(\d+) sock=(\d+)"
)


def _lua_script(target: Target) -> str:
    body = target.body.decode()
    if "]==]" in body or not all(k.isascii() and k.isprintable() for k in target.keys):
        raise ValueError("body or key cannot be embedded in the wrk script")
    # A JSON string of printable ASCII is also a valid Lua string literal.
    keys = "{" + ", ".join(json.dumps(k) for k in (target.keys or [""])) + "}"
    return _LUA.replace("{KEYS}", keys).replace("{BODY}", body).replace("{PATH}", target.path)


def _run_wrk(wrk: str, target: Target, *, connections: int, seconds: float) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="tenantserve-wrk-") as tmp:
        script = Path(tmp) / "scenario.lua"
        script.write_text(_lua_script(target))
        command = [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            # A slow model must show up as latency, not as wrk's default 2 s "timeout" error.
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{target.port}{target.path}",
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    match = _RESULT.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    requests, duration_us, p50_us, p99_us, status, sock = (int(g) for g in match.groups())
    return LoadResult(
        requests=requests,
        seconds=duration_us / 1e6,
        p50_ms=p50_us / 1000,
        p99_ms=p99_us / 1000,
        # wrk counts statuses above 399 only; a 1xx or 3xx cannot happen on these endpoints.
        non_2xx=status,
        socket_errors=sock,
        # wrk closes its connections when time is up without counting what was in flight.
        uncounted_at_most=connections,
        tool="wrk",
    )


# --- asyncio fallback -----------------------------------------------------------------------------


@dataclass
class _Tally:
    sent: int = 0
    received: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    latencies_ns: list[int] = field(default_factory=list)


def _requests(target: Target) -> list[bytes]:
    """Whole requests, encoded once: the client's own CPU cost must stay small beside wrk's."""
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(target.body)}\r\n"
    )
    keys = target.keys or [""]
    return [
        (head + (f"X-API-Key: {key}\r\n" if key else "") + "\r\n").encode() + target.body
        for key in keys
    ]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; returns its status and whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    start = lower.find(b"\r\ncontent-length:")
    if start >= 0:
        end = lower.index(b"\r\n", start + 2)
        await reader.readexactly(int(lower[start + 17 : end]))
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    return status, b"\r\nconnection: close" not in lower


async def _connection(
    port: int, requests: list[bytes], first: int, deadline: float, tally: _Tally
) -> None:
    latencies = tally.latencies_ns
    index = first
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            tally.socket_errors += 1
            await asyncio.sleep(0.05)  # do not spin on a refused connection
            continue
        try:
            keep_alive = True
            while keep_alive and time.monotonic() < deadline:
                request = requests[index % len(requests)]
                index += 1
                started = time.perf_counter_ns()
                # One request in flight per connection, so the write buffer never needs draining.
                writer.write(request)
                tally.sent += 1
                status, keep_alive = await _read_response(reader)
                latencies.append(time.perf_counter_ns() - started)
                tally.received += 1
                if not 200 <= status < 300:
                    tally.non_2xx += 1
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            tally.socket_errors += 1
        finally:
            writer.close()


async def _load(target: Target, connections: int, seconds: float) -> tuple[_Tally, float]:
    tally = _Tally()
    requests = _requests(target)
    started = time.monotonic()
    deadline = started + seconds
    tasks = [
        asyncio.create_task(_connection(target.port, requests, i, deadline, tally))
        for i in range(connections)
    ]
    # Bounded: a response that never comes must not hold the benchmark.
    _done, pending = await asyncio.wait(tasks, timeout=seconds + 15)
    for task in pending:
        task.cancel()
    return tally, time.monotonic() - started


def _percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))] / 1e6


def _run_python(target: Target, *, connections: int, seconds: float) -> LoadResult:
    try:
        import uvloop  # uvicorn[standard] brings it; it roughly halves the client's own CPU
    except ImportError:
        tally, elapsed = asyncio.run(_load(target, connections, seconds))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            tally, elapsed = runner.run(_load(target, connections, seconds))
    latencies = sorted(tally.latencies_ns)
    return LoadResult(
        requests=tally.received,
        seconds=elapsed,
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        non_2xx=tally.non_2xx,
        socket_errors=tally.socket_errors,
        # Every connection waits for its last response before it stops: only failures are unknown.
        uncounted_at_most=tally.sent - tally.received,
        tool="python",
    )
