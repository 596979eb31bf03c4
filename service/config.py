"""Every setting, read once from `TENANTSERVE_*` environment variables (and `.env`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from auth.passwords import PasswordHasher
from tenants.rate_limits import parse_limit

# Development placeholders: good enough on a laptop, refused in production.
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-in-production!"
DEV_API_KEY_PEPPER = "dev-only-api-key-pepper-change-me-in-production"
MIN_SECRET_BYTES = 32


class SettingsError(ValueError):
    """A setting that makes it unsafe or impossible to start."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TENANTSERVE_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        use_attribute_docstrings=True,
    )

    env: Literal["development", "production"] = "development"
    """`production` refuses default or short secrets."""

    database_url: str = "sqlite:///./tenantserve.db"
    """Any SQLAlchemy URL; `postgresql+psycopg://user@host/db` for several instances."""

    rate_limit_storage_uri: str = "memory://"
    """`memory://` (one process) or `redis://host:port/db` (shared by workers and instances)."""

    rate_limit_strict: bool = False
    """When the shared limiter storage is down: False serves with per-process limits, True 503s."""

    default_rate_limit: str = "600/minute"
    """A tenant's limit when it is created without one."""

    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    """HS256 signing secret for staff tokens."""

    jwt_ttl_seconds: int = Field(default=900, ge=60, le=86400)
    """Staff token lifetime."""

    api_key_pepper: SecretStr = SecretStr(DEV_API_KEY_PEPPER)
    """HMAC key under which API keys are stored."""

    bootstrap_admin_username: str | None = None
    """With the password, a platform admin that exists after start-up."""

    bootstrap_admin_password: SecretStr | None = None
    """The bootstrap admin's password (at least 12 characters)."""

    max_batch_size: int = Field(default=1000, ge=1, le=100_000)
    """Hard cap on batch items, above every tenant's own cap."""

    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Larger request bodies get 413 before they are parsed."""

    model_dir: Path = Path("./models")
    """The model registry: one folder per version."""

    model_version: str | None = None
    """The version served at start when none was activated through the API; default the newest."""

    model_max_loaded: int = Field(default=4, ge=2, le=64)
    """Most model versions one worker keeps loaded (active, rollout, pins, the previous one)."""

    model_intra_op_threads: int = Field(default=1, ge=1, le=64)
    """ONNX Runtime threads per model call in each worker (1: workers, not threads, use cores)."""

    microbatch_enabled: bool = True
    """Gather concurrent predictions into one model call."""

    microbatch_max_rows: int = Field(default=2048, ge=1)
    """Most rows in one gathered model call."""

    microbatch_max_wait_us: int = Field(default=0, ge=0, le=100_000)
    """How long a prediction may wait for company when the model is idle (0: never wait)."""

    usage_flush_interval_ms: int = Field(default=200, ge=10)
    """Longest time a usage record waits in memory before it is written."""

    usage_flush_max_rows: int = Field(default=1000, ge=1)
    """Most usage records written in one transaction."""

    usage_queue_max: int = Field(default=100_000, ge=10)
    """Queued usage records beyond which customer requests get 503 instead of going unrecorded."""

    usage_durability: Literal["journal", "written", "write-behind"] = "journal"
    """`journal`: no answer leaves before its usage record is fsync'd to the worker's journal;
    `written`: before it is written there (it survives the worker's crash or SIGKILL; fsync'd
    behind, so a power loss can take the last ~50 ms); `write-behind`: records wait in memory
    only (a crash loses up to a flush interval's)."""

    usage_journal_dir: Path = Path("./usage-journal")
    """Where each worker journals its usage records until the database has them; the next
    start replays what a crash (or a shutdown the database would not wait for) left here."""

    idempotency_ttl_s: int = Field(default=86_400, ge=1, le=7 * 86_400)
    """How long an answer to a request with an `Idempotency-Key` is kept for its retries."""

    state_poll_interval_ms: int = Field(default=250, ge=50, le=1000)
    """How often each worker checks for revocations, limit changes and model switches when
    nothing pushes them: on SQLite, and on PostgreSQL while the `LISTEN` connection is down."""

    state_safety_poll_s: float = Field(default=5.0, ge=0.5, le=60)
    """On PostgreSQL, how often each worker checks anyway while `LISTEN` hears the changes."""

    signin_rate_limit: str = "10/minute"
    """Sign-in attempts allowed per username (each lock-out is audited)."""

    signin_address_rate_limit: str = "60/minute"
    """Sign-in attempts allowed per client address (slowapi)."""

    auth_failure_limit: str = "100/minute"
    """Failed API-key authentications allowed per client address; beyond it 429 before lookup."""

    forwarded_allow_ips: str = "127.0.0.1"
    """Proxies whose `X-Forwarded-For` names the client address (uvicorn's forwarded_allow_ips)."""

    password_hash_memory_kib: int = Field(default=65536, ge=8, le=4_194_304)
    """argon2id memory cost of staff passwords, in KiB."""

    password_hash_time_cost: int = Field(default=3, ge=1, le=100)
    """argon2id passes over that memory."""

    password_hash_parallelism: int = Field(default=4, ge=1, le=64)
    """argon2id lanes (the memory cost must be at least 8 KiB per lane)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Least severe level written."""

    log_format: Literal["json", "console"] = "json"
    """`json`: one object a line (for machines); `console`: for people at a terminal."""

    log_features: bool = False
    """Log feature values of predictions (off: they may be personal data)."""

    otel_enabled: bool = False
    """FastAPI's native OpenTelemetry (traces, metrics, logs), exported as the standard
    `OTEL_*` variables say (needs the `otel` extra); off, a request pays nothing for it."""

    log_redact_keys: str = ""
    """Comma-separated extra field names to mask in logs, on top of the built-in list."""

    host: str = "127.0.0.1"
    """Address `tenantserve serve` listens on (0.0.0.0 in the container)."""

    port: int = Field(default=8000, ge=1, le=65535)
    """Port `tenantserve serve` listens on."""

    workers: int = Field(default=1, ge=1, le=64)
    """Worker processes of `tenantserve serve`."""

    shutdown_delay_s: float = Field(default=0, ge=0, le=300)
    """After SIGTERM: seconds of serving with `/ready` at 503 before the drain starts."""

    @field_validator(
        "default_rate_limit", "signin_rate_limit", "signin_address_rate_limit", "auth_failure_limit"
    )
    @classmethod
    def _valid_limit(cls, value: str) -> str:
        parse_limit(value)
        return value

    @field_validator("bootstrap_admin_password")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 12:
            raise ValueError("must be at least 12 characters")
        return value

    def password_hasher(self) -> PasswordHasher:
        return PasswordHasher(
            memory_kib=self.password_hash_memory_kib,
            time_cost=self.password_hash_time_cost,
            parallelism=self.password_hash_parallelism,
        )

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env != "production":
            return self
        for name, secret, default in (
            ("TENANTSERVE_JWT_SECRET", self.jwt_secret, DEV_JWT_SECRET),
            ("TENANTSERVE_API_KEY_PEPPER", self.api_key_pepper, DEV_API_KEY_PEPPER),
        ):
            value = secret.get_secret_value()
            if value == default or len(value.encode()) < MIN_SECRET_BYTES:
                raise SettingsError(
                    f"{name} must be set to a random value of at least "
                    f"{MIN_SECRET_BYTES} bytes when TENANTSERVE_ENV=production"
                )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
