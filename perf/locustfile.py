"""Locust users for tenantserve: authenticated predictions, and a probe of the 429 path.

    locust -f perf/locustfile.py --headless -u 64 -r 16 -t 30s PredictUser

Configured only from the environment, so one file serves every machine without edits:
  TENANTSERVE_PERF_HOST             base URL (default http://127.0.0.1:8000; `--host` wins)
  TENANTSERVE_PERF_KEYS_FILE        JSON list of API keys (default perf/.keys.json: perf.provision)
  TENANTSERVE_PERF_PROBE_KEYS_FILE  low-limit keys for RateLimitProbeUser (default: the keys file)
  TENANTSERVE_PERF_BATCH_SIZE       items per batch request (default 100)
  TENANTSERVE_PERF_WAIT             seconds between a user's tasks (default 0: closed loop)

FastHttpUser, not HttpUser: the latter costs ~4x the CPU per request and measures itself.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, task
from locust.contrib.fasthttp import ResponseContextManager

HOST = os.environ.get("TENANTSERVE_PERF_HOST", "http://127.0.0.1:8000")
KEYS_FILE = Path(os.environ.get("TENANTSERVE_PERF_KEYS_FILE", "perf/.keys.json"))
PROBE_KEYS_FILE = Path(os.environ.get("TENANTSERVE_PERF_PROBE_KEYS_FILE", str(KEYS_FILE)))
BATCH_SIZE = int(os.environ.get("TENANTSERVE_PERF_BATCH_SIZE", "100"))
WAIT = float(os.environ.get("TENANTSERVE_PERF_WAIT", "0"))

IRIS = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


@cache
def _key_cycle(path: Path) -> Iterator[str]:
    """Round-robin over a keys file, read on first use so `locust --list` works without one."""
    try:
        keys = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RuntimeError(f"cannot read API keys from {path}: run perf.provision") from error
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise RuntimeError(f"{path} must hold a non-empty JSON list of API keys")
    return itertools.cycle(keys)


def features() -> dict[str, float]:
    """Iris features moved a little, so no layer can answer from a cache of one body."""
    return {name: round(value * random.uniform(0.9, 1.1), 2) for name, value in IRIS.items()}


def _problem(response: ResponseContextManager) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def failure_reason(response: ResponseContextManager) -> str:
    """One clear line per status, so the failures table tells what to fix."""
    status = response.status_code
    problem = _problem(response)
    code = problem.get("code", "?")
    if status == 0:
        return f"no response: {getattr(response, 'error', None)}"
    if status == 401:
        return f"401 key refused ({code}): revoked, expired or not this server's key"
    if status == 403:
        return f"403 {code}: tenant suspended or key without scope predict"
    if status == 413:
        return f"413 {code}: body too large, lower TENANTSERVE_PERF_BATCH_SIZE"
    if status == 422:
        return f"422 {code}: {problem.get('errors')}"
    if status == 429:
        retry = response.headers.get("Retry-After") if response.headers else None
        return f"429 {code}, Retry-After={retry}: limit reached, provision a higher --rate-limit"
    if status == 503:
        return f"503 {code}: server not ready or overloaded"
    return f"unexpected {status}: {(response.text or '')[:200]}"


class PredictUser(FastHttpUser):
    """The customer's path: single predictions, and now and then a batch."""

    host = HOST
    wait_time = constant(WAIT)
    weight = 100  # when no class is named, nearly every user is this one

    def on_start(self) -> None:
        self.api_key = next(_key_cycle(KEYS_FILE))

    @task(10)
    def predict(self) -> None:
        with self.client.post(
            "/v1/predict",
            json=features(),
            headers={"X-API-Key": self.api_key},
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(failure_reason(response))
            elif "species" not in _problem(response):
                response.failure("200 without a prediction in the body")

    @task(1)
    def predict_batch(self) -> None:
        items = [features() for _ in range(BATCH_SIZE)]
        with self.client.post(
            "/v1/predict/batch",
            json={"items": items},
            headers={"X-API-Key": self.api_key},
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(failure_reason(response))
            elif len(_problem(response).get("predictions", [])) != BATCH_SIZE:
                response.failure(f"200 without {BATCH_SIZE} predictions in the body")


class RateLimitProbeUser(FastHttpUser):
    """Exceeds its key's limit on purpose, to measure the 429 path; name it on the command line.

    Give it keys with a low limit (see perf/README.md). Its 429s are successes, reported under
    their own name so they are not mixed with the requests the limit let through.
    """

    host = HOST
    wait_time = constant(0)  # as fast as possible: the point is to exceed the limit
    weight = 1

    def on_start(self) -> None:
        self.api_key = next(_key_cycle(PROBE_KEYS_FILE))

    @task
    def exceed_limit(self) -> None:
        with self.client.post(
            "/v1/predict",
            json=features(),
            headers={"X-API-Key": self.api_key},
            name="/v1/predict [probe]",
            catch_response=True,
        ) as response:
            if response.status_code == 429:
                response.request_meta["name"] = "/v1/predict [expected 429]"
                if not response.headers or "Retry-After" not in response.headers:
                    response.failure("429 without Retry-After")
                else:
                    response.success()
            elif response.status_code == 200:
                # Within the limit: still correct, and counted apart from the 429s.
                response.request_meta["name"] = "/v1/predict [under limit]"
                response.success()
            else:
                response.failure(failure_reason(response))
