"""Settings: production refuses unsafe secrets at start, and `.env.example` documents every one."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import main
from service.config import Settings, get_settings
from tests.conftest import ROOT
from tests.test_registry import completed, start_tenantserve

GOOD_JWT = "j" * 32
GOOD_PEPPER = "p" * 40
JWT, PEPPER = "TENANTSERVE_JWT_SECRET", "TENANTSERVE_API_KEY_PEPPER"
Outcome = subprocess.CompletedProcess[str]

# case → (secrets in the environment, the variable the refusal must name)
REFUSED: dict[str, tuple[dict[str, str], str]] = {
    "default secrets": ({}, JWT),
    "empty secret": ({JWT: "", PEPPER: GOOD_PEPPER}, JWT),
    "short secret": ({JWT: "j" * 31, PEPPER: GOOD_PEPPER}, JWT),
    "short pepper": ({JWT: GOOD_JWT, PEPPER: "p" * 31}, PEPPER),
    "default pepper": ({JWT: GOOD_JWT}, PEPPER),
}
# Each process spends seconds importing before it refuses, on a machine shared with every other
# test: these two go through a real process, the rest through the same `main()` in this one.
IN_A_PROCESS = ("default secrets", "short pepper")


def production_env(cwd: Path) -> dict[str, str]:
    """Production, and a start that fails at once should the secrets ever be accepted."""
    (cwd / "a-file").touch()
    return {
        "TENANTSERVE_ENV": "production",
        "TENANTSERVE_MODEL_DIR": str(cwd / "a-file" / "models"),
        "TENANTSERVE_DATABASE_URL": f"sqlite:///{cwd / 'tenantserve.db'}",
    }


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    cwd = tmp_path_factory.mktemp("production")  # no `.env` here to read
    processes = {
        case: start_tenantserve("serve", env={**production_env(cwd), **REFUSED[case][0]}, cwd=cwd)
        for case in IN_A_PROCESS
    }
    return {case: completed(process, timeout=90) for case, process in processes.items()}


def serve_in_this_process(
    secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch, cwd: Path
) -> Outcome:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"TENANTSERVE_{name.upper()}", raising=False)
    for name, value in {**production_env(cwd), **secrets}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(cwd)
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            main(["serve"])
    finally:
        get_settings.cache_clear()
    code = exited.value.code
    # sys.exit("message") prints the message to stderr and exits with status 1.
    if isinstance(code, str):
        return subprocess.CompletedProcess(["serve"], 1, "", f"{code}\n")
    return subprocess.CompletedProcess(["serve"], int(code or 0), "", "")


@pytest.mark.parametrize("case", REFUSED)
def test_production_refuses_to_start_with_unsafe_secrets(
    refusals: dict[str, Outcome], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str
) -> None:
    secrets, variable = REFUSED[case]
    done = refusals.get(case) or serve_in_this_process(secrets, monkeypatch, tmp_path)
    assert done.returncode != 0
    message = done.stderr.strip()
    assert "\n" not in message, f"expected one line, got:\n{message}"
    assert variable in message
    assert "production" in message
    for value in secrets.values():
        if value:
            assert value not in done.stdout + done.stderr, "a secret was echoed"


def production(**secrets: str) -> Settings:
    return Settings(_env_file=None, env="production", **secrets)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "jwt_secret", ["j" * 32, "é" * 16, "a-much-longer-random-looking-secret-0123456789"]
)
def test_production_accepts_secrets_of_32_bytes_or_more(jwt_secret: str) -> None:
    settings = production(jwt_secret=jwt_secret, api_key_pepper=GOOD_PEPPER)
    assert settings.env == "production"
    assert settings.jwt_secret.get_secret_value() == jwt_secret
    assert jwt_secret not in repr(settings), "secrets must not show in a repr (or a log)"


def test_secrets_are_counted_in_bytes_not_characters() -> None:
    with pytest.raises(ValidationError, match=JWT):
        production(jwt_secret="é" * 15 + "x", api_key_pepper=GOOD_PEPPER)  # 16 chars, 31 bytes


def test_production_reads_its_secrets_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENANTSERVE_ENV", "production")
    monkeypatch.setenv(JWT, GOOD_JWT)
    monkeypatch.setenv(PEPPER, GOOD_PEPPER)
    settings = Settings(_env_file=None)
    assert settings.api_key_pepper.get_secret_value() == GOOD_PEPPER
    monkeypatch.setenv(PEPPER, "too-short")
    with pytest.raises(ValidationError, match=PEPPER):
        Settings(_env_file=None)


def test_development_starts_with_the_built_in_secrets() -> None:
    assert Settings(_env_file=None, env="development").env == "development"


def test_no_environment_but_production_and_development_exists() -> None:
    # An environment that is neither would be one that skips the production secret checks.
    with pytest.raises(ValidationError, match="env"):
        Settings(_env_file=None, env="test")


ENV_EXAMPLE = ROOT / ".env.example"


@pytest.fixture
def env_example() -> Path:
    if not ENV_EXAMPLE.exists():
        pytest.skip(".env.example is not written yet")
    return ENV_EXAMPLE


def test_env_example_lists_every_setting(env_example: Path) -> None:
    listed = set(re.findall(r"^#?\s*(TENANTSERVE_[A-Z0-9_]+)=", env_example.read_text(), re.M))
    expected = {f"TENANTSERVE_{name.upper()}" for name in Settings.model_fields}
    assert expected - listed == set(), "settings missing from .env.example"


def test_env_example_shows_the_real_defaults(
    env_example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the example as a `.env` changes nothing: every value it sets is the default."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"TENANTSERVE_{name.upper()}", raising=False)
    from_example = Settings(_env_file=env_example)
    defaults = Settings(_env_file=None)
    differing = {
        name
        for name in Settings.model_fields
        if getattr(from_example, name) != getattr(defaults, name)
    }
    assert differing == set()
