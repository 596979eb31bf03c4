"""`tenantserve`: serve, train models, migrate, and run tenants, keys and users without HTTP.

No command takes a password or secret on its command line: they come from the environment
or a prompt, so they never land in shell history or `ps`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from pydantic import ValidationError
from uvicorn.supervisors import Multiprocess

from service.config import Settings, get_settings
from service.http_protocol import OneWriteProtocol
from service.listening import SPREADS_CONNECTIONS, ReusePortSocket
from service.logging import configure_logging, stdlib_logging_config
from service.serving.registry import (
    ALGORITHMS,
    ModelError,
    list_versions,
    refuse_legacy_versions,
)
from service.serving.runtime import load_model
from service.startup import ensure_bootstrap_admin, startup_version
from tenants import audit, repository
from tenants.database import make_engine, unit_of_work, upgrade
from tenants.errors import AppError
from tenants.schemas import KeyCreate, TenantCreate, TenantPublic, UserCreate, UserPublic

log = structlog.get_logger("tenantserve.cli")
APP = "service.main:create_app"
NEW_USER_PASSWORD_ENV = "TENANTSERVE_NEW_USER_PASSWORD"


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            message = f"TENANTSERVE_{str(error['loc'][0]).upper()}: {message}"
        sys.exit(f"tenantserve: refusing to start: {message}")


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _train_default_versions(model_dir: Path) -> list[str]:
    """Train the defaults into an empty registry, in a child process.

    Not here: with one worker this process is the worker, and it must never import scikit-learn.
    """
    if list_versions(model_dir):
        return []
    done = subprocess.run(  # noqa: S603 (this interpreter, our own module, no shell)
        [sys.executable, "-m", "service.serving.training", str(model_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(
            f"training the default versions into the empty registry {model_dir} failed "
            f"({reason}); training needs the `tenantserve[train]` extra"
        )
    trained: list[str] = json.loads(done.stdout)
    return trained


def _serve_with_a_socket_per_worker(config: uvicorn.Config) -> None:
    """uvicorn's supervisor, with the listener of `service.listening` in place of its shared one."""
    try:
        listener = ReusePortSocket.for_workers(config.host, config.port)
    except OSError as exc:
        sys.exit(f"tenantserve: refusing to start: {config.host}:{config.port}: {exc.strerror}")
    log.info(
        "listening",
        url=f"http://{config.host}:{config.port}",
        workers=config.workers,
        socket="one per worker (SO_REUSEPORT)",
    )
    Multiprocess(config, sockets=[listener]).run()


def serve(_args: argparse.Namespace) -> None:
    settings = _settings()
    configure_logging(settings)
    try:
        refuse_legacy_versions(settings.model_dir)
        trained = _train_default_versions(settings.model_dir)
    except ModelError as exc:
        sys.exit(f"tenantserve: refusing to start: {exc}")
    engine = make_engine(settings.database_url)
    upgrade(engine)  # once, before any worker starts
    ensure_bootstrap_admin(engine, settings, settings.password_hasher())
    version = startup_version(engine, settings)
    engine.dispose()
    try:
        # A refused model stops here, in one line, rather than in every worker's traceback.
        load_model(settings.model_dir, version)
    except ModelError as exc:
        sys.exit(f"tenantserve: refusing to start: {exc}")
    metrics_dir = None
    if settings.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="tenantserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if trained:
        log.info("models_trained", versions=trained)
    if settings.env == "development":
        # A log line like every other: whatever reads stdout parses every line as JSON.
        log.info(
            "get_a_first_key",
            url=f"http://{settings.host}:{settings.port}",
            docs=f"http://{settings.host}:{settings.port}/docs",
            commands=[
                ".venv/bin/tenantserve tenants create --name demo",
                ".venv/bin/tenantserve keys issue --tenant demo --name first-key",
            ],
        )
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "log_config": stdlib_logging_config(settings),
        "access_log": False,
        "timeout_graceful_shutdown": 30,
        # uvicorn's default of 5 s can kill a worker still importing its libraries on a busy
        # host; its replacement starts just as slowly, so the server never comes up.
        "timeout_worker_healthcheck": 30,
        "server_header": False,
        # Behind a trusted proxy `scope["client"]` is the real caller: failed authentications
        # are counted per client address.
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "ws": "none",  # no WebSocket routes: an upgrade attempt is refused before any app code
        "http": OneWriteProtocol,
    }
    if settings.workers > 1 and SPREADS_CONNECTIONS:
        _serve_with_a_socket_per_worker(uvicorn.Config(APP, **options))
    else:
        uvicorn.run(APP, **options)
    if metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)


# NOTE: the model commands import training (scikit-learn) and importing (onnx) inside the
# function, not at the top: every worker process imports this module, and must carry neither.


def _model_command(action: Callable[[Path], Any]) -> None:
    """Run a registry action and print its result; a refusal is one line, no traceback."""
    try:
        _print(action(_settings().model_dir))
    except ModelError as exc:
        sys.exit(f"tenantserve: {exc}")


def train(args: argparse.Namespace) -> None:
    from service.serving.training import train as train_version

    _model_command(lambda models: train_version(models, args.version, args.algorithm).public())


def import_onnx(args: argparse.Namespace) -> None:
    from service.serving.importing import import_model

    _model_command(lambda models: import_model(models, Path(args.file), args.version).public())


def upgrade_models(_args: argparse.Namespace) -> None:
    from service.serving.training import upgrade_legacy_versions

    _model_command(lambda models: {"upgraded": upgrade_legacy_versions(models)})


def list_models(_args: argparse.Namespace) -> None:
    def listing(models: Path) -> list[dict[str, Any]]:
        refuse_legacy_versions(models)
        return [m.public() for m in list_versions(models)]

    _model_command(listing)


def db_upgrade(_args: argparse.Namespace) -> None:

    upgrade(make_engine(_settings().database_url))
    print("database schema is up to date")


def _with_session(action: Callable[[Any, Settings], Any]) -> Any:
    """Run an operator action in one transaction, with the audit trail naming the CLI."""

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    try:
        with unit_of_work(engine) as session:
            return action(session, settings)
    except AppError as exc:
        sys.exit(f"tenantserve: {exc.detail}")
    except ValidationError as exc:
        sys.exit(f"tenantserve: {exc.errors()[0]['msg']}")


def _audit(session: Any, action: str, target: str, tenant_id: str | None) -> None:

    actor = f"cli:{getpass.getuser()}"
    audit.record(session, actor=actor, action=action, target=target, tenant_id=tenant_id,
                 request_id=None)  # fmt: skip


def create_tenant(args: argparse.Namespace) -> None:

    def action(session: Any, settings: Settings) -> Any:
        data = TenantCreate(
            name=args.name, rate_limit=args.rate_limit, max_batch_size=args.max_batch_size,
            monthly_quota=args.monthly_quota,
        )  # fmt: skip
        tenant = repository.create_tenant(
            session, data, default_rate_limit=settings.default_rate_limit,
            default_max_batch=settings.max_batch_size,
        )  # fmt: skip
        _audit(session, "tenant.create", tenant.id, tenant.id)
        return TenantPublic.model_validate(tenant, from_attributes=True).model_dump(mode="json")

    _print(_with_session(action))


def list_tenants(_args: argparse.Namespace) -> None:

    _print(
        _with_session(
            lambda session, _s: [
                TenantPublic.model_validate(t, from_attributes=True).model_dump(mode="json")
                for t in repository.list_tenants(session, scope=None)
            ]
        )
    )


def issue_key(args: argparse.Namespace) -> None:

    def action(session: Any, settings: Settings) -> Any:
        tenant = repository.find_tenant(session, args.tenant)
        data = KeyCreate(name=args.name, scopes=args.scopes, rate_limit=args.rate_limit)
        pepper = settings.api_key_pepper.get_secret_value()
        key, token = repository.issue_key(session, tenant, data, pepper=pepper)
        _audit(session, "key.issue", key.id, tenant.id)
        return {**repository.key_public(key).model_dump(mode="json"), "key": token}

    issued = _with_session(action)
    _print(issued)
    print("\nStore this key now: it is not shown again. Try it:\n"
          f"  curl -s -X POST http://127.0.0.1:8000/v1/predict -H 'X-API-Key: {issued['key']}' "
          "-H 'Content-Type: application/json' \\\n"
          "    -d '{\"sepal_length\": 5.1, \"sepal_width\": 3.5, \"petal_length\": 1.4, "
          "\"petal_width\": 0.2}'", file=sys.stderr)  # fmt: skip


def list_keys(args: argparse.Namespace) -> None:

    def action(session: Any, _settings: Settings) -> Any:
        tenant = repository.find_tenant(session, args.tenant)
        return [
            repository.key_public(k).model_dump(mode="json")
            for k in repository.list_keys(session, tenant.id, scope=None)
        ]

    _print(_with_session(action))


def revoke_key(args: argparse.Namespace) -> None:

    def action(session: Any, _settings: Settings) -> Any:
        key = repository.revoke_key(session, repository.get_key(session, args.key_id, scope=None))
        _audit(session, "key.revoke", key.id, key.tenant_id)
        return repository.key_public(key).model_dump(mode="json")

    _print(_with_session(action))


def create_user(args: argparse.Namespace) -> None:

    password = os.environ.get(NEW_USER_PASSWORD_ENV) or getpass.getpass("Password: ")

    def action(session: Any, settings: Settings) -> Any:
        tenant_id = repository.find_tenant(session, args.tenant).id if args.tenant else None
        data = UserCreate(username=args.username, password=password, role=args.role,
                          tenant_id=tenant_id)  # fmt: skip
        user = repository.create_user(
            session, data, password_hash=settings.password_hasher().hash(password)
        )
        _audit(session, "user.create", user.id, user.tenant_id)
        return UserPublic.model_validate(user, from_attributes=True).model_dump(mode="json")

    _print(_with_session(action))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenantserve", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="command")

    def command(
        group: Any, name: str, handler: Callable[[argparse.Namespace], None], text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    def group(name: str, text: str) -> Any:
        return commands.add_parser(name, help=text).add_subparsers(required=True, metavar="action")

    command(commands, "serve", serve, "Serve the API (migrates, trains defaults if none).")

    models = group("models", "Model versions in TENANTSERVE_MODEL_DIR.")
    train_cmd = command(models, "train", train, "Train a version on scikit-learn's iris data.")
    train_cmd.add_argument("--version", required=True)
    train_cmd.add_argument("--algorithm", choices=ALGORITHMS, default="logreg")
    command(models, "list", list_models, "List the versions.")
    imported = command(
        models, "import", import_onnx,
        "Add an ONNX classifier trained elsewhere: float input [N, 4], probabilities [N, 3].",
    )  # fmt: skip
    imported.add_argument("file", metavar="FILE.onnx")
    imported.add_argument("--version", required=True)
    command(
        models, "upgrade", upgrade_models,
        "Retrain the skops versions of an earlier release as ONNX, same names.",
    )  # fmt: skip

    db = group("db", "The database schema.")
    command(db, "upgrade", db_upgrade, "Apply the schema migrations.")

    tenants = group("tenants", "Tenants.")
    create = command(tenants, "create", create_tenant, "Create a tenant.")
    create.add_argument("--name", required=True)
    create.add_argument("--rate-limit")
    create.add_argument("--max-batch-size", type=int)
    create.add_argument("--monthly-quota", type=int)
    command(tenants, "list", list_tenants, "List tenants.")

    keys = group("keys", "API keys.")
    issue = command(keys, "issue", issue_key, "Issue a key (printed once).")
    issue.add_argument("--tenant", required=True, help="tenant id or name")
    issue.add_argument("--name", required=True)
    issue.add_argument("--scopes", nargs="+", default=["predict", "usage:read"])
    issue.add_argument("--rate-limit")
    command(keys, "list", list_keys, "List a tenant's keys.").add_argument(
        "--tenant", required=True
    )
    command(keys, "revoke", revoke_key, "Revoke a key now.").add_argument("key_id")

    users = group("users", "Staff users.")
    user = command(
        users, "create", create_user,
        f"Create a staff user; the password comes from ${NEW_USER_PASSWORD_ENV} or a prompt.",
    )  # fmt: skip
    user.add_argument("--username", required=True)
    user.add_argument("--role", choices=["admin", "auditor"], required=True)
    user.add_argument("--tenant", help="restrict the user to this tenant (id or name)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.handler(args)
