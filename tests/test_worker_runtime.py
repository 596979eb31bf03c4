"""A real worker serves both model versions with ONNX Runtime alone.

Training needs scikit-learn (and so scipy); serving must not carry them: the worker's memory map
shows which shared objects it has loaded. With one worker, the server process is the worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FEATURES, bearer, live_server, new_customer

VERSIONS = ("v1-forest", "v2-logreg")
# Packages whose compiled modules a worker must never map; onnx is only for `models import`.
NOT_IN_A_WORKER = ("sklearn", "scikit_learn", "scipy", "skops", "onnx")


def loaded_packages(pid: int) -> set[str]:
    """Top-level site-packages folders of every file the process has mapped."""
    packages = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if "site-packages/" in path:
            packages.add(path.split("site-packages/", 1)[1].split("/", 1)[0])
    return packages


@pytest.mark.slow
def test_a_worker_predicts_with_both_versions_without_scikit_learn_or_scipy(
    model_dir: Path, tmp_path: Path
) -> None:
    env = {
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'tenantserve.db'}",
        "TENANTSERVE_MODEL_DIR": str(model_dir),
        "TENANTSERVE_USAGE_JOURNAL_DIR": str(tmp_path / "journal"),
    }
    with live_server(env, tmp_path / "server.log") as server, server.client() as client:
        customer = new_customer(client)
        for version in VERSIONS:
            activated = client.post(
                f"/v1/admin/models/{version}/activate", headers=bearer(customer.token)
            )
            assert activated.status_code == 200, activated.text
            answer = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == version
            assert answer.json()["species"] == "setosa"
        packages = loaded_packages(server.process.pid)
    assert "onnxruntime" in packages, f"the map was not read right: {sorted(packages)}"
    assert "numpy" in packages
    loaded = {name for name in packages if name.split("-")[0].split(".")[0] in NOT_IN_A_WORKER}
    assert not loaded, f"the worker loaded {sorted(loaded)}"
