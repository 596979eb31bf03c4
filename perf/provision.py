"""Create (or reuse) a load-test tenant and issue API keys for it, through the admin HTTP API.

    TENANTSERVE_PERF_ADMIN_USERNAME=... TENANTSERVE_PERF_ADMIN_PASSWORD=... \\
        python -m perf.provision --tenant loadtest --keys 20 --out perf/.keys.json

Admin credentials come from the environment only: argv is visible to every user of the machine
(`ps`) and lands in shell history. The keys file is written 0600 and ignored by git.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_HOST = "http://127.0.0.1:8000"
# High enough that the limiter is exercised on every request but never answers 429 in a load run.
DEFAULT_RATE_LIMIT = "1000000/minute"


class ProvisionError(RuntimeError):
    """The server refused a step; the message names the step, the status and the problem code."""


def _check(response: httpx.Response, step: str, *expected: int) -> Any:
    if response.status_code not in expected:
        try:
            problem = response.json()
            reason = f"{problem.get('code')}: {problem.get('detail')}"
        except ValueError:
            reason = response.text[:200]
        raise ProvisionError(f"{step}: HTTP {response.status_code} ({reason})")
    return response.json()


def admin_token(client: httpx.Client, username: str, password: str) -> str:
    """A staff JWT from the OAuth2 password form."""
    response = client.post("/v1/auth/token", data={"username": username, "password": password})
    token: str = _check(response, "sign-in", 200)["access_token"]
    return token


def _tenants(client: httpx.Client) -> Iterator[dict[str, Any]]:
    """Every tenant, whether the list comes as a bare array or as cursor pages."""
    cursor: str | None = None
    while True:
        params = {"cursor": cursor} if cursor else {}
        page = _check(client.get("/v1/admin/tenants", params=params), "list tenants", 200)
        if isinstance(page, list):
            yield from page
            return
        yield from page.get("items", [])
        cursor = page.get("next_cursor")
        if not cursor:
            return


def ensure_tenant(
    client: httpx.Client,
    *,
    name: str,
    rate_limit: str,
    max_batch_size: int | None = None,
    monthly_quota: int | None = None,
) -> str:
    """The id of tenant `name`, created if missing; an existing one is set to the given limits."""
    fields: dict[str, Any] = {"rate_limit": rate_limit, "monthly_quota": monthly_quota}
    if max_batch_size is not None:
        fields["max_batch_size"] = max_batch_size
    response = client.post("/v1/admin/tenants", json={"name": name, **fields})
    if response.status_code != 409:
        tenant_id: str = _check(response, "create tenant", 201)["id"]
        return tenant_id
    for tenant in _tenants(client):
        if tenant["name"] == name:
            # A reused tenant may carry a small limit or a suspension from an earlier experiment.
            update = {**fields, "status": "active"}
            _check(client.patch(f"/v1/admin/tenants/{tenant['id']}", json=update), "update", 200)
            existing: str = tenant["id"]
            return existing
    raise ProvisionError(f"tenant {name!r} exists (409) but is not in the tenant list")


def issue_key(client: httpx.Client, *, tenant_id: str, name: str) -> dict[str, Any]:
    """Issue one key: its `key` secret is in this 201 response and nowhere else, ever."""
    response = client.post(f"/v1/admin/tenants/{tenant_id}/keys", json={"name": name})
    issued: dict[str, Any] = _check(response, f"issue key {name}", 201)
    return issued


def issue_keys(client: httpx.Client, *, tenant_id: str, count: int, name: str) -> list[str]:
    """Issue `count` keys named `name-1`, `name-2`, ...; returns the secrets."""
    return [
        str(issue_key(client, tenant_id=tenant_id, name=f"{name}-{number}")["key"])
        for number in range(1, count + 1)
    ]


def write_keys(path: Path, keys: list[str]) -> None:
    """Write the keys 0600 from the first byte: a chmod afterwards leaves a readable window."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(keys, handle, indent=1)
        handle.write("\n")
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed


def provision(
    base_url: str,
    *,
    username: str,
    password: str,
    tenant: str,
    keys: int,
    rate_limit: str = DEFAULT_RATE_LIMIT,
    max_batch_size: int | None = None,
    monthly_quota: int | None = None,
) -> tuple[str, list[str]]:
    """Sign in, ensure the tenant, issue the keys: returns the tenant id and the keys."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        token = admin_token(client, username, password)
        client.headers["Authorization"] = f"Bearer {token}"
        tenant_id = ensure_tenant(
            client, name=tenant, rate_limit=rate_limit, max_batch_size=max_batch_size,
            monthly_quota=monthly_quota,
        )  # fmt: skip
        return tenant_id, issue_keys(client, tenant_id=tenant_id, count=keys, name=tenant)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf.provision", description="Provision a load-test tenant and keys."
    )
    parser.add_argument("--host", default=os.environ.get("TENANTSERVE_PERF_HOST", DEFAULT_HOST))
    parser.add_argument("--tenant", default="loadtest")
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("perf/.keys.json"))
    parser.add_argument("--rate-limit", default=DEFAULT_RATE_LIMIT, help="the tenant's limit")
    parser.add_argument("--max-batch-size", type=int, default=1000)
    args = parser.parse_args(argv)
    username = os.environ.get("TENANTSERVE_PERF_ADMIN_USERNAME")
    password = os.environ.get("TENANTSERVE_PERF_ADMIN_PASSWORD")
    if not username or not password:
        print(
            "set TENANTSERVE_PERF_ADMIN_USERNAME and TENANTSERVE_PERF_ADMIN_PASSWORD",
            file=sys.stderr,
        )
        return 2
    try:
        tenant_id, keys = provision(
            args.host,
            username=username,
            password=password,
            tenant=args.tenant,
            keys=args.keys,
            rate_limit=args.rate_limit,
            max_batch_size=args.max_batch_size,
        )
    except (ProvisionError, httpx.HTTPError, ValueError, KeyError) as error:
        print(f"provision failed: {error}", file=sys.stderr)
        return 1
    write_keys(args.out, keys)
    print(f"tenant {args.tenant} ({tenant_id}): {len(keys)} keys written to {args.out} (0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
