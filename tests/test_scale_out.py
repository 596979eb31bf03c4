"""Two instances of two workers behind HAProxy, sharing PostgreSQL and Redis, as deployed.

HAProxy runs `deploy/haproxy/haproxy.cfg` itself, pointed at loopback: round robin, and an
instance gets traffic only while its `/ready` answers 200.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import (
    FEATURES,
    REDIS_URL,
    Customer,
    LiveServer,
    admin_token,
    bearer,
    free_port,
    live_server,
    new_customer,
    server_env,
    wait_for,
)
from tests.test_change_feed import refused_everywhere_within_a_second, revoke
from tests.test_deploy import HAPROXY_CFG, haproxy
from tests.test_usage import LoadResult, all_records, assert_recorded_once

__all__ = ["haproxy"]  # a fixture, used by name
WORKERS = 2
# HAProxy checks every second and takes an instance out after 2 failures: the drain outlasts it.
SHUTDOWN_DELAY_S = 3.5


@dataclass
class Cluster:
    url: str
    """HAProxy's address: where clients go."""
    ports: list[int]
    envs: list[dict[str, str]]
    logs: Path
    instances: list[LiveServer] = field(default_factory=list)
    stacks: list[ExitStack] = field(default_factory=list)
    starts: int = 0

    def start(self, index: int) -> None:
        """Start instance `index` (again) on its port, and wait until HAProxy sends it traffic."""
        if index < len(self.stacks):
            self.stacks[index].close()  # what is left of the previous run: nothing, or its workers
        self.starts += 1
        stack = ExitStack()
        log_path = self.logs / f"instance-{index}-{self.starts}.log"
        server = stack.enter_context(
            live_server(self.envs[index], log_path, workers=WORKERS, port=self.ports[index])
        )
        self.stacks[index:index + 1] = [stack]  # fmt: skip
        self.instances[index:index + 1] = [server]  # fmt: skip
        with httpx.Client(base_url=self.url, timeout=10) as client:
            wait_for(lambda: served(client, server), within=15)


def served(client: httpx.Client, server: LiveServer) -> bool:
    """Whether a request through the balancer, or the one after it, reached `server`."""
    before = server.output().count('"path":"/health"')
    for _ in range(2):
        client.get("/health")
    return server.output().count('"path":"/health"') > before


@pytest.fixture(scope="module")
def cluster(
    haproxy: str, postgresql_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    redis.Redis.from_url(REDIS_URL).flushdb()
    logs = tmp_path_factory.mktemp("scale-out")
    ports = [free_port(), free_port()]
    envs = [
        server_env(
            postgresql_url,
            model_dir,
            rate_limit_storage_uri=REDIS_URL,
            shutdown_delay_s=str(SHUTDOWN_DELAY_S),
            usage_journal_dir=str(logs / f"journal-{n}"),
        )
        for n in range(2)
    ]
    balancer = free_port()
    haproxy_env = {
        "PATH": os.environ["PATH"],
        "HAPROXY_BIND": f"127.0.0.1:{balancer}",
        "TENANTSERVE_1_ADDR": f"127.0.0.1:{ports[0]}",
        "TENANTSERVE_2_ADDR": f"127.0.0.1:{ports[1]}",
    }
    cluster = Cluster(f"http://127.0.0.1:{balancer}", ports, envs, logs)
    with (logs / "haproxy.log").open("wb") as haproxy_log:
        balancer_process = subprocess.Popen(
            [haproxy, "-db", "-f", str(HAPROXY_CFG)], env=haproxy_env,
            stdout=haproxy_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        for index in range(2):
            cluster.start(index)
        yield cluster
    finally:
        with ThreadPoolExecutor(2) as pool:  # both drains at once
            list(pool.map(ExitStack.close, cluster.stacks))
        balancer_process.terminate()
        balancer_process.wait(timeout=10)


def predict(client: httpx.Client, customer: Customer, request_id: str) -> httpx.Response:
    headers = {**customer.headers, "X-Request-ID": request_id}
    return client.post("/v1/predict", json=FEATURES, headers=headers)


def served_predictions(server: LiveServer) -> int:
    return server.output().count('"path":"/v1/predict"')


def test_a_burst_of_twice_the_limit_admits_exactly_the_limit_across_instances(
    cluster: Cluster,
) -> None:
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        customer = new_customer(client, rate_limit="20/minute")
    gate = threading.Barrier(40, timeout=30)

    def one(index: int) -> int:
        # Half straight to each instance: the balancer's choice (an instance it has just
        # counted out after a slow check on a busy machine) must not decide what is tested.
        with cluster.instances[index % 2].client() as fresh:  # its own connection
            gate.wait()
            return predict(fresh, customer, f"burst-{uuid.uuid4().hex}").status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = Counter(pool.map(one, range(40)))
    # 20 to each instance: limits kept per instance would have admitted all 40.
    assert statuses == {200: 20, 429: 20}


def test_revocation_and_activation_reach_both_instances_within_a_second(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        customer = new_customer(client)
        for server in cluster.instances:  # cached by both instances
            with server.client() as direct:
                assert predict(direct, customer, "warm").status_code == 200
        revoked_at = revoke(client, customer.key["id"], customer.token)
        for server in cluster.instances:
            refused_everywhere_within_a_second(server.url, customer.key["key"], revoked_at)

        other = new_customer(client, customer.token, tenant=customer.tenant)
        served_now = predict(client, other, "before").json()["model_version"]
        switch_to = "v1-forest" if served_now == "v2-logreg" else "v2-logreg"
        try:
            activated = client.post(
                f"/v1/admin/models/{switch_to}/activate", headers=bearer(customer.token)
            )
            assert activated.status_code == 200, activated.text
            activated_at = time.monotonic()
            for server in cluster.instances:
                with server.client() as direct:

                    def switched() -> bool:
                        answer = predict(direct, other, f"switch-{uuid.uuid4().hex}")
                        return bool(answer.json()["model_version"] == switch_to)

                    wait_for(switched, within=1.0, since=activated_at)
        finally:
            client.post(f"/v1/admin/models/{served_now}/activate", headers=bearer(customer.token))


def load_until(url: str, customer: Customer, result: LoadResult, done: threading.Event) -> None:
    """Predictions over one keep-alive connection to the balancer until `done`.

    An answer of tenantserve's counts as answered; HAProxy's own error pages (an instance
    killed mid-request) and broken connections do not.
    """
    with httpx.Client(base_url=url, timeout=10) as client:
        while not done.is_set():
            request_id = f"load-{uuid.uuid4().hex}"
            try:
                response = predict(client, customer, request_id)
            except httpx.HTTPError:
                result.record(request_id, None)
                continue
            ours = "X-Request-ID" in response.headers
            result.record(request_id, response.status_code if ours else None)


@contextmanager
def under_load(cluster: Cluster, rate_limit: str, clients: int = 4) -> Iterator[Load]:
    """A new customer's predictions from `clients` threads through the balancer, for the block."""
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        customer = new_customer(client, rate_limit=rate_limit)
    load = Load(customer)
    threads = [
        threading.Thread(target=load_until, args=(cluster.url, customer, load.result, load.done))
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(load.result.answered) >= 50, within=30)
        yield load
    finally:
        load.done.set()
        for thread in threads:
            thread.join(timeout=30)


@dataclass
class Load:
    customer: Customer
    result: LoadResult = field(default_factory=LoadResult)
    done: threading.Event = field(default_factory=threading.Event)


def test_sigterm_of_one_instance_under_load_fails_no_request(cluster: Cluster) -> None:
    leaving = cluster.instances[1]
    with under_load(cluster, "1000000/minute") as load:
        assert leaving.stop() == 0  # SIGTERM: /ready 503, serve on for the delay, then drain
        time.sleep(0.5)  # and the balancer still answers everything with the other instance
        wait_for(lambda: len(load.result.sent) > 100, within=60)  # however slow the machine
    assert len(load.result.sent) > 100
    assert Counter(load.result.answered.values()) == {200: len(load.result.sent)}
    assert served_predictions(leaving) > 0
    cluster.start(1)


def test_sigkill_of_one_instance_loses_no_usage_record(cluster: Cluster) -> None:
    killed = cluster.instances[1]
    with under_load(cluster, "1000000/minute") as load:
        wait_for(lambda: served_predictions(killed) >= 20, within=10)
        os.killpg(killed.process.pid, signal.SIGKILL)
        killed.process.wait()
        time.sleep(1.0)
        wait_for(lambda: len(load.result.answered) > 100, within=60)  # however slow the machine
    answered = Counter(load.result.answered.values())
    assert set(answered) == {200} and answered[200] > 100
    cluster.start(1)  # replays what the killed workers journalled
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        token = admin_token(client)
        tenant_id = load.customer.tenant["id"]

        def recorded() -> list[dict[str, Any]]:
            return all_records(client, token, tenant_id=tenant_id)

        answered_ids = set(load.result.answered)
        wait_for(lambda: {r["request_id"] for r in recorded()} >= answered_ids, within=10)
        assert_recorded_once(recorded(), load.result)


def test_a_high_limit_keeps_its_redis_window_bounded(cluster: Cluster) -> None:
    with under_load(cluster, "1000000/second") as load:
        time.sleep(1.5)  # hits spread over more than a window
        # More hits than the window has slices, however slow the machine answers them.
        wait_for(lambda: len(load.result.answered) > 200, within=60)
    store = redis.Redis.from_url(REDIS_URL)
    (window,) = list(store.scan_iter(f"tenantserve:rlh:*{load.customer.key['id']}*"))
    # At most 201 slices (the window's 200 and the one it is entering) and the three bookkeeping
    # fields, whatever the limit and the hits; it expires a window and a slice (5 ms) after the
    # newest slice began.
    assert len(load.result.answered) > 200
    assert store.hlen(window) <= 204
    assert 0 < store.pttl(window) <= 1005
