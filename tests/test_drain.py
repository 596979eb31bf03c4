"""SIGTERM as a load balancer needs it: unready at once, still serving for the delay, then gone."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FEATURES, live_server, new_customer, wait_for

pytestmark = pytest.mark.slow
DELAY_S = 3


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_turns_ready_off_first_and_keeps_serving_for_the_delay(
    model_dir: Path, tmp_path: Path, workers: int
) -> None:
    env = {
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'tenantserve.db'}",
        "TENANTSERVE_MODEL_DIR": str(model_dir),
        "TENANTSERVE_SHUTDOWN_DELAY_S": str(DELAY_S),
    }
    with live_server(env, tmp_path / "server.log", workers=workers) as server:
        with server.client() as client:
            customer = new_customer(client)
            assert client.get("/ready").status_code == 200
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

        def unready() -> bool:
            with httpx.Client(base_url=server.url, timeout=2) as fresh:  # any worker
                return all(fresh.get("/ready").status_code == 503 for _ in range(4))

        wait_for(unready, within=1.0, since=signalled)
        with httpx.Client(base_url=server.url, timeout=2) as fresh:
            report = fresh.get("/ready").json()
            assert report["status"] == "not_ready" and report["checks"]["shutdown"] == "draining"
            assert fresh.get("/v2/health/ready").status_code == 503
            while time.monotonic() < signalled + DELAY_S - 1:
                answer = fresh.post("/v1/predict", json=FEATURES, headers=customer.headers)
                assert answer.status_code == 200, "still serving during the delay"
                time.sleep(0.1)
        server.process.wait(timeout=40)
        assert time.monotonic() - signalled >= DELAY_S
    output = server.output()
    assert output.count('"event":"draining"') == workers
    assert output.count('"event":"stopped"') == workers, "each worker wrote usage out and closed"
