"""API shapes: what admins send (Create / Update) and what they get back (Public)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema

from auth.passwords import MIN_PASSWORD_LENGTH
from auth.principals import ALL_SCOPES, Role, Scope
from tenants.rate_limits import RATE_LIMIT_PATTERN, parse_limit


def _valid_limit(value: str | None) -> str | None:
    if value is not None:
        parse_limit(value)
    return value


RateLimitText = Annotated[
    str,
    StringConstraints(max_length=64, pattern=RATE_LIMIT_PATTERN),
    AfterValidator(_valid_limit),
    Field(examples=["600/minute"], description="`<count>/[<multiple>]<second|minute|hour|day>`"),
]
ModelVersionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# What an INTEGER column holds: larger numbers are 422, never an overflow in the database.
INT32_MAX = 2_147_483_647
MonthlyQuota = Annotated[int, Field(ge=0, le=INT32_MAX, description="predictions per month")]
BatchCap = Annotated[int, Field(ge=1, le=100_000)]
# PostgreSQL text holds no NUL character, so none is accepted anywhere (SQLite would take it).
NO_NUL = r"^[^\x00]*$"
Name = Annotated[
    str,
    # The pattern says what stripping leaves: one character that is neither space nor NUL.
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00]*[^\s\x00][^\x00]*$"
    ),
]
Username = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        min_length=3,
        max_length=100,
        pattern=r"^\s*[^\s\x00][^\x00]+[^\s\x00]\s*$",  # three characters once stripped
    ),
]


def _in_utc(moment: datetime) -> datetime:
    """A zone-less time is read as UTC; a moment outside UTC's years 1-9999 is refused, for
    no column can store it (`0001-01-01T00:00:00+01:00` is in the year 0 in UTC)."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    try:
        return aware.astimezone(UTC)
    except OverflowError:
        raise ValueError("outside the years 1 to 9999 once in UTC") from None


UtcMoment = Annotated[datetime, AfterValidator(_in_utc)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(Strict):
    name: Name
    rate_limit: RateLimitText | None = None
    max_batch_size: BatchCap | None = None
    monthly_quota: MonthlyQuota | None = None


class TenantUpdate(Strict):
    # Absent means unchanged; null is refused where it means nothing (the repository says so),
    # and the document shows no null there: SkipJsonSchema keeps it out of the schema only.
    name: Name | SkipJsonSchema[None] = None
    rate_limit: RateLimitText | SkipJsonSchema[None] = None
    max_batch_size: BatchCap | SkipJsonSchema[None] = None
    monthly_quota: MonthlyQuota | None = Field(default=None, description="null: no quota")
    status: Literal["active", "suspended"] | SkipJsonSchema[None] = None
    model_version: ModelVersionName | None = Field(
        default=None, description="pin a registered version; null follows the platform"
    )
    allow_version_choice: bool | SkipJsonSchema[None] = None


class TenantPublic(BaseModel):
    id: str
    name: str
    status: Literal["active", "suspended"]
    rate_limit: str
    max_batch_size: int
    monthly_quota: int | None
    model_version: str | None
    allow_version_choice: bool
    created_at: datetime


class KeyCreate(Strict):
    name: Name
    scopes: list[Scope] = Field(default_factory=lambda: list(ALL_SCOPES), min_length=1)
    rate_limit: RateLimitText | None = None
    expires_at: UtcMoment | None = None

    @field_validator("expires_at")
    @classmethod
    def _aware_future(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value <= datetime.now(UTC):
            raise ValueError("expires_at must be in the future")
        return value


class KeyRotate(Strict):
    grace_seconds: int = Field(default=0, ge=0, le=86_400)


class KeyPublic(BaseModel):
    id: str
    prefix: str = Field(description="The key's public start, to recognise it in logs and lists")
    name: str
    scopes: list[Scope]
    rate_limit: str | None
    expires_at: datetime | None
    status: Literal["active", "revoked"]
    created_at: datetime
    tenant_id: str


class KeyIssued(KeyPublic):
    key: str = Field(description="The API key. Shown in this response only: store it now.")


class UserCreate(Strict):
    username: Username
    password: Annotated[str, StringConstraints(min_length=MIN_PASSWORD_LENGTH, max_length=1024)]
    role: Role
    tenant_id: str | None = None


class UserPublic(BaseModel):
    id: str
    username: str
    role: Role
    tenant_id: str | None
    created_at: datetime


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class AuditEventPublic(BaseModel):
    id: str
    at: datetime
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]
    request_id: str | None


class AuditEventPage(BaseModel):
    items: list[AuditEventPublic]
    next_cursor: str | None
