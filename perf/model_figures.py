"""Model runtime figures: a model call inline against one handed to the model thread, and a
worker's start-up time and memory with both model versions loaded.

    .venv/bin/python -m perf.model_figures     # about a minute; 127.0.0.1 only

Targets (issue 12): a worker under 120 MB resident with both versions loaded, `tenantserve
serve` answering `/ready` 200 within 3 s on an existing registry. The machine is shared and
noisy: call timings are the best of several repeats, start-ups are each given.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import secrets
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import uvloop

from perf import provision, servers
from service.serving.batcher import INLINE_BUDGET_S, INLINE_MAX_ROWS, MicroBatcher
from service.serving.runtime import LoadedModel, load_model

VERSIONS = ("v1-forest", "v2-logreg")
IRIS = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
HEAVY = ("sklearn", "scipy", "skops")  # what a worker must not have loaded
REPEATS = 7


def _best_us(action: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(action, number=number, repeat=REPEATS)) / number * 1e6


def _through_batcher_us(model: LoadedModel, rows: np.ndarray, *, inline: bool, users: int) -> float:
    """Wall time per prediction: `users` callers each awaiting 300 predictions in turn."""

    async def run() -> float:
        batcher = MicroBatcher(
            enabled=True, max_rows=2048, max_wait_us=0,
            inline_max_rows=10**9 if inline else 0, inline_budget_s=math.inf if inline else 0,
        )  # fmt: skip

        async def caller() -> None:
            for _ in range(300):
                await batcher.predict(model, rows)

        try:
            await caller()  # warm-up
            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(users)))
            return (time.perf_counter() - started) / (300 * users) * 1e6
        finally:
            batcher.close()

    return min(uvloop.run(run()) for _ in range(REPEATS))


def model_calls(model_dir: Path) -> None:
    print("model calls, µs (best of 7): direct | via the batcher: model thread vs inline")
    print(f"{'version':<10} {'rows':>4} {'direct':>7} {'thread':>7} {'inline':>7}   callers")
    inline_rows = []
    for version in VERSIONS:
        model = load_model(model_dir, version)
        inline_rows.append(f"{version} {INLINE_BUDGET_S / model.row_seconds:.0f}")
        for rows_per_call, users in ((1, 1), (16, 1), (64, 1), (1, 64)):
            rows = np.tile(np.array([list(IRIS.values())]), (rows_per_call, 1))
            direct = _best_us(functools.partial(model.predict_proba, rows), 2000)
            thread = _through_batcher_us(model, rows, inline=False, users=users)
            inline = _through_batcher_us(model, rows, inline=True, users=users)
            print(
                f"{version:<10} {rows_per_call:>4} {direct:>7.1f} {thread:>7.1f} {inline:>7.1f}"
                f"   {users}"
            )
    print(
        f"(the batcher runs calls of <= {INLINE_MAX_ROWS} rows inline, and larger ones its cost "
        f"measure puts within {INLINE_BUDGET_S * 1e6:.0f} µs, here up to rows: "
        f"{', '.join(inline_rows)}; the rest in the thread)"
    )


def _memory_mb(pid: int) -> dict[str, float]:
    """RSS and its peak; PSS counts pages shared with other workers (libraries) only in part."""
    fields = {}
    for source in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        for line in Path(source).read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Pss", "Anonymous"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def _workers(server: servers.Server, count: int) -> list[int]:
    """The worker processes: the server itself when it runs one, else its spawned children."""
    if count == 1:
        return [server.process.pid]
    return [
        pid
        for pid in servers.descendants(server.process.pid)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _loaded(pid: int, names: tuple[str, ...]) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [name for name in names if f"/{name}/" in maps]


def _predict_with_both(url: str, admin: tuple[str, str]) -> None:
    _, keys = provision.provision(
        url, username=admin[0], password=admin[1], tenant="figures", keys=1,
        rate_limit="1000000/minute", max_batch_size=1000,
    )  # fmt: skip
    with httpx.Client(base_url=url, timeout=10) as client:
        token = provision.admin_token(client, *admin)
        for version in VERSIONS:
            activated = client.post(
                f"/v1/admin/models/{version}/activate",
                headers={"Authorization": f"Bearer {token}"},
            )
            activated.raise_for_status()
            for _ in range(50):
                answer = client.post("/v1/predict", json=IRIS, headers={"X-API-Key": keys[0]})
                answer.raise_for_status()
                assert answer.json()["model_version"] == version, answer.text
            batch = client.post(
                "/v1/predict/batch", json={"items": [IRIS] * 500}, headers={"X-API-Key": keys[0]}
            )
            batch.raise_for_status()


def server_figures(model_dir: Path, scratch: Path, starts: int, workers: int) -> None:
    admin = ("figures-admin", secrets.token_urlsafe(24))
    env = servers.tenantserve_env(
        port=servers.free_port(),
        workers=workers,
        database_url=f"sqlite:///{scratch / 'figures.db'}",
        limiter_uri="memory://",
        model_dir=model_dir,
        admin=admin,
    )
    log_path = scratch / "tenantserve.log"
    print(f"\n`tenantserve serve` ({workers} worker(s), SQLite, a registry) until /ready 200")
    for attempt in range(1 + starts):
        started = time.monotonic()
        server = servers.start_tenantserve(env, log_path=log_path, cwd=scratch, probe="/ready")
        ready_s = time.monotonic() - started
        try:
            # CPU seconds too: on a shared machine the wall time says as much about the others.
            cpu_s = servers.tree_cpu_total(server.process.pid)
            label = "first start (new database)" if attempt == 0 else f"start {attempt}"
            print(f"  {label:<28} {ready_s:5.2f} s wall, {cpu_s:5.2f} s CPU")
            if attempt == starts:
                ready = {pid: _memory_mb(pid) for pid in _workers(server, workers)}
                _predict_with_both(server.url, admin)
                for pid in _workers(server, workers):
                    memory = _memory_mb(pid)
                    print(
                        f"worker {pid} ready: RSS {ready[pid]['VmRSS']:.0f} MB (peak "
                        f"{ready[pid]['VmHWM']:.0f}); after a sign-in (argon2: its memory cost "
                        f"for a moment) and predictions with both versions: RSS "
                        f"{memory['VmRSS']:.0f} MB (peak {memory['VmHWM']:.0f}), PSS "
                        f"{memory['Pss']:.0f} MB, anonymous {memory['Anonymous']:.0f} MB; "
                        f"loaded of {', '.join(HEAVY)}: {', '.join(_loaded(pid, HEAVY)) or 'none'}"
                    )
        finally:
            servers.stop(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.model_figures", description=__doc__)
    parser.add_argument("--starts", type=int, default=3, help="timed starts after the first")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tenantserve-figures-") as folder:
        scratch = Path(folder)
        model_dir = scratch / "models"
        # Trained in a child process, as `serve` does: this one measures the runtime alone.
        subprocess.run(
            [sys.executable, "-m", "service.serving.training", str(model_dir)],
            check=True,
            capture_output=True,
        )
        model_calls(model_dir)
        server_figures(model_dir, scratch, args.starts, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
