"""The deployment files, checked offline by the tools an operator would trust, run for real.

The Kubernetes manifests against the API schema (kubernetes-validate) and checkov's security
checks, the compose file against the Compose Specification's JSON schema (check-jsonschema),
the HAProxy config by haproxy itself; then what no schema knows: the shutdown arithmetic,
secrets by reference only, and where a read-only pod may write. The tools live in
.venv-tools/ (`make .venv-tools/.installed-stamp`); a missing one skips here and fails in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI, ROOT, unavailable

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
TOOLS = ROOT / ".venv-tools" / "bin"
# The oldest Kubernetes release the manifests promise to work on.
KUBERNETES_VERSION = "1.31.0"
# How long the app's graceful drain may take after the shutdown delay (uvicorn's timeout).
DRAIN_S = 30
SECRET_SETTINGS = {
    "TENANTSERVE_JWT_SECRET",
    "TENANTSERVE_API_KEY_PEPPER",
    "TENANTSERVE_DATABASE_URL",
    "TENANTSERVE_RATE_LIMIT_STORAGE_URI",
    "TENANTSERVE_BOOTSTRAP_ADMIN_PASSWORD",
}


def manifest_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("*.yaml"))


def manifests() -> Iterator[dict[str, Any]]:
    for path in manifest_files():
        yield from (doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod template's spec, by the kind and name of its owner."""
    return {
        f"{doc['kind']}/{doc['metadata']['name']}": doc["spec"]["template"]["spec"]
        for doc in manifests()
        if doc["kind"] in {"Deployment", "Job"}
    }


def api_pod() -> dict[str, Any]:
    return pod_specs()["Deployment/tenantserve"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        unavailable(f"{path} (make .venv-tools/.installed-stamp)")
    return str(path)


def run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


def assert_succeeded(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"


def test_manifests_match_the_kubernetes_schema() -> None:
    # --strict refuses unknown fields, so a misspelt key fails instead of being ignored.
    result = run(
        tool("kubernetes-validate"),
        "--strict",
        "--quiet",
        "--kubernetes-version",
        KUBERNETES_VERSION,
        *map(str, manifest_files()),
    )
    assert_succeeded(result)


def test_manifests_pass_checkov() -> None:
    # One run for the whole folder: checkov takes seconds to start. --skip-download: offline,
    # no policy metadata fetched from its vendor's platform.
    result = run(
        tool("checkov"),
        "--directory",
        str(KUBERNETES),
        "--framework",
        "kubernetes",
        "--quiet",
        "--compact",
        "--skip-download",
    )
    assert_succeeded(result)


def test_every_checkov_skip_says_why() -> None:
    for path in manifest_files():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if "checkov.io/skip" not in line:
                continue
            reason = line.partition("=")[2].strip()
            assert reason, f"{path}:{number + 1}: a skip without a reason"
            assert lines[number - 1].strip().startswith("#"), (
                f"{path}:{number + 1}: no comment above the skip says why"
            )


def test_compose_file_matches_the_compose_spec() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert_succeeded(result)


@pytest.fixture(scope="module")
def haproxy() -> str:
    found = shutil.which("haproxy")
    if found is None and IN_CI:
        # CI machines start without it; the test brings it rather than skipping.
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "haproxy"],
        ):
            assert_succeeded(run(*command, env={"DEBIAN_FRONTEND": "noninteractive"}))
        found = shutil.which("haproxy")
    if found is None:
        unavailable("haproxy (apt-get install haproxy)")
    assert found is not None
    return found


def test_haproxy_config_is_valid_on_loopback(haproxy: str) -> None:
    # As a multi-instance test runs it: every address given, so not even a warning (-dW).
    loopback = {
        "HAPROXY_BIND": "127.0.0.1:18000",
        "TENANTSERVE_1_ADDR": "127.0.0.1:18001",
        "TENANTSERVE_2_ADDR": "127.0.0.1:18002",
    }
    assert_succeeded(run(haproxy, "-dW", "-c", "-f", str(HAPROXY_CFG), env=loopback))


def test_haproxy_config_is_valid_with_compose_defaults(haproxy: str) -> None:
    # The compose service names resolve only inside the stack: here they start as down.
    result = run(haproxy, "-c", "-f", str(HAPROXY_CFG))
    assert_succeeded(result)
    assert "could not resolve address 'tenantserve-1'" in result.stderr


def test_grace_period_outlasts_the_shutdown() -> None:
    pod = api_pod()
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    delay = int(env_of(container)["TENANTSERVE_SHUTDOWN_DELAY_S"]["value"])
    assert delay > 0
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + delay + DRAIN_S

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("tenantserve-1", "tenantserve-2"):
        grace = int(services[name]["stop_grace_period"].removesuffix("s"))
        assert grace > int(services[name]["environment"]["TENANTSERVE_SHUTDOWN_DELAY_S"]) + DRAIN_S


def test_secrets_are_referenced_never_written() -> None:
    assert not [doc for doc in manifests() if doc["kind"] == "Secret"]
    for owner, pod in pod_specs().items():
        for container in pod["containers"]:
            for name, entry in env_of(container).items():
                if name in SECRET_SETTINGS:
                    assert "value" not in entry, f"{owner}: {name} written in the manifest"
                    assert entry["valueFrom"]["secretKeyRef"]["key"] == name
    assert set(env_of(api_pod()["containers"][0])) >= SECRET_SETTINGS

    # On the laptop, Redis has no password: its URL is no secret there.
    compose_secrets = SECRET_SETTINGS - {"TENANTSERVE_RATE_LIMIT_STORAGE_URI"}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for service in services.values():
        for name, value in service.get("environment", {}).items():
            if name in compose_secrets | {"POSTGRES_PASSWORD"}:
                assert re.search(r"\$\{\w+:\?", value), f"{name} must come from deploy/.env"


def test_pods_write_only_to_their_empty_dirs() -> None:
    for owner, pod in pod_specs().items():
        # Service links would set TENANTSERVE_PORT=tcp://… from the Service named tenantserve.
        assert pod["enableServiceLinks"] is False, owner
        assert pod["automountServiceAccountToken"] is False, owner
        empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, owner
            mounts = [
                PurePosixPath(mount["mountPath"])
                for mount in container["volumeMounts"]
                if mount["name"] in empty_dirs
            ]
            writes = [PurePosixPath("/tmp")]  # noqa: S108 - the container's /tmp, not ours
            writes += [
                PurePosixPath(entry["value"])
                for name, entry in env_of(container).items()
                if name.endswith("_DIR") and "value" in entry
            ]
            for path in writes:
                assert any(path.is_relative_to(mount) for mount in mounts), f"{owner}: {path}"


def test_one_release_everywhere() -> None:
    images = {container["image"] for pod in pod_specs().values() for container in pod["containers"]}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    images |= {services[name]["image"] for name in ("migrate", "tenantserve-1", "tenantserve-2")}
    assert len(images) == 1, images
    (image,) = images
    assert re.fullmatch(r"tenantserve:\d+\.\d+\.\d+", image), image
