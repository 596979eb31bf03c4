"""Several workers of one server each take a share of the connections that arrive together.

With one listening socket shared by every worker, a burst of new connections (a balancer's pool,
a load test's 64) often went mostly or only to one worker while the other idled.
"""

from __future__ import annotations

import json
from collections import Counter
from http.client import HTTPConnection
from urllib.parse import urlsplit
from uuid import uuid4

from tests.conftest import LiveServer, wait_for

CONNECTIONS = 64


def serving_pids(server: LiveServer, marker: str) -> Counter[int]:
    """How many of the requests whose id starts with `marker` each worker answered."""
    pids: Counter[int] = Counter()
    for line in server.output().splitlines():
        if marker in line:
            entry = json.loads(line)
            if entry.get("event") == "request" and entry["request_id"].startswith(marker):
                pids[entry["pid"]] += 1
    return pids


def test_connections_opened_together_are_shared_by_both_workers(two_workers: LiveServer) -> None:
    marker = f"spread-{uuid4().hex[:8]}"
    address = urlsplit(two_workers.url)
    connections = [
        HTTPConnection(str(address.hostname), address.port, timeout=10) for _ in range(CONNECTIONS)
    ]
    for connection in connections:  # all open before the first request, as a load test's are
        connection.connect()
    statuses = []
    for index, connection in enumerate(connections):
        connection.request("GET", "/health", headers={"X-Request-ID": f"{marker}-{index}"})
    for connection in connections:
        statuses.append(connection.getresponse().status)
        connection.close()
    assert statuses == [200] * CONNECTIONS

    wait_for(lambda: sum(serving_pids(two_workers, marker).values()) == CONNECTIONS, within=5)
    shares = serving_pids(two_workers, marker)
    # The kernel spreads connections by a hash of their addresses: half each on average, and
    # fewer than 16 of 64 for either worker about once in 27,000 runs.
    assert len(shares) == 2 and min(shares.values()) >= 16, shares
