"""`/metrics` as Prometheus scrapes it from a server with two workers: every count adds up.

Counters are compared as differences between a scrape before the workload and each scrape
after it, so the readiness polls of the test harness do not matter. A request is counted just
after its response is sent, so before each scrape the test waits for the log line of every
earlier request: it is written right after the counters are incremented.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tenants.database import make_engine
from tests.conftest import FEATURES, LiveServer, admin_token, bearer, live_server, new_customer

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
OPERATIONS = ("/health", "/ready", "/metrics")


def parse(exposition: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_by_route(samples: Samples) -> Counter[tuple[str, str, str]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    for (name, labels), count in samples.items():
        if name == "tenantserve_requests_total":
            found = dict(labels)
            counts[found["route"], found["method"], found["status"]] = int(count)
    return counts


def request_lines(server: LiveServer) -> dict[str, dict[str, Any]]:
    """Each request's log line, by request id."""
    lines = (json.loads(line) for line in server.output().splitlines())
    return {line["request_id"]: line for line in lines if line["event"] == "request"}


def wait_until_logged(server: LiveServer, responses: Iterable[httpx.Response]) -> None:
    """Until each response's request line is out, and with it the request's counts."""
    pending = {response.headers["X-Request-ID"] for response in responses}
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        output = server.output()
        pending = {rid for rid in pending if f'"request_id":"{rid}","method"' not in output}
        time.sleep(0.05)
    assert not pending, f"no request line for {pending}"


class Scraper:
    """Scrapes on fresh connections, so either worker may answer, one scrape after another."""

    def __init__(self, server: LiveServer, client: httpx.Client) -> None:
        self.server, self.client = server, client
        self.responses: list[httpx.Response] = []

    def __call__(self) -> Samples:
        response = self.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        self.responses.append(response)
        wait_until_logged(self.server, [response])
        return parse(response.text)

    def pids(self) -> list[int]:
        """The worker that answered each scrape, in order."""
        logged = request_lines(self.server)
        return [logged[response.headers["X-Request-ID"]]["pid"] for response in self.responses]


def test_metrics_add_up_across_two_workers(tmp_path: Path, model_dir: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'tenantserve.db'}"
    env = {"TENANTSERVE_DATABASE_URL": database_url, "TENANTSERVE_MODEL_DIR": str(model_dir)}
    fresh_connections = httpx.Limits(max_keepalive_connections=0)
    setup: list[httpx.Response] = []
    with (
        live_server(env, tmp_path / "server.log", workers=2) as server,
        server.client(limits=fresh_connections, event_hooks={"response": [setup.append]}) as client,
    ):
        token = admin_token(client)
        customer = new_customer(client, token)
        limited = new_customer(client, token, tenant=customer.tenant, rate_limit="1/minute")
        models = client.get("/v1/admin/models", headers=bearer(token)).json()
        # A worker counts a request after its answer: the other may be scraped before that.
        wait_until_logged(server, list(setup))
        scrape = Scraper(server, client)
        before = scrape()

        def predict(body: object, headers: dict[str, str]) -> httpx.Response:
            return client.post("/v1/predict", json=body, headers=headers)

        def batch(size: int) -> httpx.Response:
            items = {"items": [FEATURES] * size}
            return client.post("/v1/predict/batch", json=items, headers=customer.headers)

        invalid = {**FEATURES, "sepal_length": 0}
        workload = [
            *(predict(FEATURES, customer.headers) for _ in range(7)),
            *(batch(size) for size in (2, 5, 3)),
            batch(0),  # 422: a batch holds at least one item
            *(predict(invalid, customer.headers) for _ in range(4)),
            *(predict(FEATURES, limited.headers) for _ in range(6)),
        ]
        wait_until_logged(server, workload)

        statuses = Counter((response.url.path, response.status_code) for response in workload)
        assert statuses[("/v1/predict", 422)] == 4
        assert statuses[("/v1/predict/batch", 422)] == 1
        assert statuses[("/v1/predict", 429)] >= 4  # one a minute, on each of two workers
        served = [response.json() for response in workload if response.status_code == 200]
        version = served[0]["model_version"]
        predictions = sum(len(body.get("predictions", [body])) for body in served)
        [algorithm] = [v["algorithm"] for v in models["versions"] if v["version"] == version]

        expected = Counter(
            {(path, "POST", str(status)): count for (path, status), count in statuses.items()}
        )
        # A dozen scrapes at least, until both workers have answered: each must show the sums,
        # which a worker that served part of the workload or none can only add up from both.
        scrapes_before = 0
        while scrapes_before < 12 or len(set(scrape.pids())) < 2:
            scrapes_before += 1
            assert scrapes_before <= 60, "one worker answered every scrape"
            after = scrape()
            expected["/metrics", "GET", "200"] = scrapes_before
            assert requests_by_route(after) - requests_by_route(before) == expected

            def grown(name: str, after: Samples = after, **labels: str) -> float:
                return value(after, name, **labels) - value(before, name, **labels)

            assert grown("tenantserve_predictions_total", model_version=version) == predictions
            assert grown("tenantserve_batch_items_count") == 3
            assert grown("tenantserve_batch_items_sum") == 2 + 5 + 3
            assert grown("tenantserve_batch_items_bucket", le="2.0") == 1
            assert (
                grown("tenantserve_rejections_total", reason="rate_limit")
                == statuses[("/v1/predict", 429)]
            )
            assert grown("tenantserve_request_duration_seconds_count", route="/v1/predict") == (
                sum(count for (path, _), count in statuses.items() if path == "/v1/predict")
            )
            assert value(after, "tenantserve_usage_queue_depth") >= 0
            assert ("tenantserve_usage_queue_depth", frozenset()) in after
            model_info = {"version": version, "algorithm": algorithm}
            assert value(after, "tenantserve_model_info", **model_info) == 1

        # A newly activated version takes the old one's place, once each worker has swapped
        # and refreshed its gauge by answering a scrape.
        [other] = [v for v in models["versions"] if v["version"] != version]
        url = f"/v1/admin/models/{other['version']}/activate"
        assert client.post(url, headers=bearer(token)).status_code == 200
        deadline = time.monotonic() + 20
        while value(after, "tenantserve_model_info", **model_info) and time.monotonic() < deadline:
            time.sleep(0.1)
            after = scrape()
        assert value(after, "tenantserve_model_info", **model_info) == 0
        other_info = {"version": other["version"], "algorithm": other["algorithm"]}
        assert value(after, "tenantserve_model_info", **other_info) == 1

        # Outside authentication and limits: no credentials, a forged token, a spent key.
        for headers in ({}, bearer("not-a-jwt"), limited.headers):
            for path in OPERATIONS:
                for _ in range(5):
                    response = client.get(path, headers=headers)
                    assert response.status_code == 200, (path, response.text)
                    assert not [h for h in response.headers if h.startswith("x-ratelimit")]
        server.stop()  # writes every queued usage record

    engine = make_engine(database_url)
    with engine.connect() as connection:
        paths = Counter(connection.scalars(text("SELECT path FROM usage_records")))
    engine.dispose()
    assert paths == {"/v1/predict": 17, "/v1/predict/batch": 4}  # every customer request
    assert not set(paths) & set(OPERATIONS)
