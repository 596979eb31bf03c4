"""structlog set up once: one JSON object a line on stdout (uvicorn's lines too), secrets masked.

NOTE: the request line is the hot path's only log call, so structlog renders it straight to
bytes with orjson; the stdlib chain (used by uvicorn's own loggers) costs ~120 µs a line.
"""

from __future__ import annotations

import ipaddress
import logging
import logging.config
import re
import sys
from collections.abc import Iterable, MutableMapping
from functools import lru_cache
from typing import Any

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor

from service.config import Settings

MASK = "[REDACTED]"
SENSITIVE_KEYS = frozenset(
    {
        "authorization", "x-api-key", "x_api_key", "api_key", "apikey", "key", "password",
        "passwd", "token", "access_token", "refresh_token", "jwt", "secret", "jwt_secret",
        "api_key_pepper", "pepper", "cookie", "set-cookie", "email",
    }
)  # fmt: skip
# An API key anywhere in a string, and anything shaped like a JWT (three base64url parts).
_SECRET_PATTERN = re.compile(
    r"tsk_[A-Za-z0-9_]{6,}|eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"
)


class Redactor:
    """Masks sensitive keys at any depth and secret-shaped strings anywhere, message included."""

    def __init__(self, extra_keys: Iterable[str] = ()) -> None:
        self._keys = SENSITIVE_KEYS | {k.strip().lower() for k in extra_keys if k.strip()}

    def __call__(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        return self._mapping(event_dict)

    def _mapping(self, mapping: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in mapping.items():
            if isinstance(key, str) and key.lower() in self._keys and value is not None:
                mapping[key] = MASK
            else:
                mapping[key] = self._value(value)
        return mapping

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return (
                _SECRET_PATTERN.sub(MASK, value) if ("tsk_" in value or "eyJ" in value) else value
            )
        if isinstance(value, dict):
            return self._mapping(dict(value))
        if isinstance(value, (list, tuple)):
            return [self._value(v) for v in value]
        return value


def _drop_color_message(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


def _orjson_bytes(obj: Any, **_kw: Any) -> bytes:
    return orjson.dumps(obj, default=str)


def _orjson_text(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _shared_processors(settings: Settings) -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_color_message,
        structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
        Redactor(settings.log_redact_keys.split(",")),
    ]


def _renderer(settings: Settings, *, as_bytes: bool) -> Processor:
    if settings.log_format == "console":
        return structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    if as_bytes:
        return structlog.processors.JSONRenderer(serializer=_orjson_bytes)
    return structlog.processors.JSONRenderer(serializer=_orjson_text)


def configure_logging(settings: Settings) -> None:
    level = logging.getLevelNamesMapping()[settings.log_level]
    console = settings.log_format == "console"
    structlog.configure(
        processors=[
            *_shared_processors(settings),
            _renderer(settings, as_bytes=not console),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=(
            structlog.PrintLoggerFactory(sys.stdout)
            if console
            else structlog.BytesLoggerFactory(sys.stdout.buffer)
        ),
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(stdlib_logging_config(settings))


def stdlib_formatter(settings: Settings | None = None) -> logging.Formatter:
    """uvicorn's and every library's records, rendered by the same structlog chain."""
    from service.config import get_settings

    settings = settings or get_settings()
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(settings),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _renderer(settings, as_bytes=False),
        ],
    )


def stdlib_logging_config(settings: Settings) -> dict[str, Any]:
    """For `dictConfig` and uvicorn's `log_config`; no access log (ours is better)."""
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "structlog",
        "stream": "ext://sys.stdout",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structlog": {"()": "service.logging.stdlib_formatter"}},
        "handlers": {"stdout": handler},
        "root": {"handlers": ["stdout"], "level": settings.log_level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": settings.log_level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": settings.log_level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "alembic": {"handlers": [], "level": "WARNING", "propagate": True},
        },
    }


@lru_cache(maxsize=4096)
def anonymise_ip(address: str | None) -> str | None:
    """IPv4 with its last octet zeroed, IPv6 cut to its /48: enough to see patterns, not people."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)
