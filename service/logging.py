"""structlog set up once: one JSON object a line on stdout (uvicorn's lines too), secrets masked.

NOTE: the request line is the hot path's only log call, so structlog renders it straight to
bytes with orjson; the stdlib chain (used by uvicorn's own loggers) costs ~120 µs a line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import logging.config
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, BinaryIO, cast

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor

from service.config import Settings, get_settings

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


_SCALARS = frozenset({int, float, bool, type(None)})
_KNOWN_NAMES_MAX = 4096
"""Field names remembered as not sensitive; past this many, names are checked every time."""

REQUEST_ID: ContextVar[str | None] = ContextVar("tenantserve_request_id", default=None)
"""The id of the request being served, on every line logged while serving it, whoever logs it."""


class Redactor:
    """Masks sensitive keys at any depth and secret-shaped strings anywhere, message included."""

    def __init__(self, extra_keys: Iterable[str] = ()) -> None:
        self._keys = SENSITIVE_KEYS | {k.strip().lower() for k in extra_keys if k.strip()}
        self._plain: set[str] = set()
        """Names already found not sensitive: a line's names are mostly the same every time."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """The built-in keys plus the operator's `TENANTSERVE_LOG_REDACT_KEYS` (comma-separated)."""
        return cls(settings.log_redact_keys.split(","))

    def __call__(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        return self._mapping(event_dict)

    def _mapping(self, mapping: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # NOTE: this runs on every request line: plain strings and numbers are checked inline
        # (a string only scanned when it could hold a secret), containers recursively.
        for key, value in mapping.items():
            kind = type(value)
            if kind is str:
                if "tsk_" in value or "eyJ" in value:
                    mapping[key] = _SECRET_PATTERN.sub(MASK, value)
            elif kind not in _SCALARS:
                mapping[key] = self._value(value)
        for key in mapping.keys() - self._plain:
            if not isinstance(key, str):
                continue
            if key.lower() not in self._keys:
                if len(self._plain) < _KNOWN_NAMES_MAX:
                    self._plain.add(key)
            elif mapping[key] is not None:
                mapping[key] = MASK
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


def _add_request_id(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


class _Timestamp:
    """`timestamp`: UTC, ISO 8601 with microseconds and a `Z`, as structlog's `TimeStamper`
    writes it, for less: the date and time of day are formatted once a second."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second, formatted = self._second
        if int(now) != second:
            second = int(now)
            formatted = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, formatted)
        event_dict["timestamp"] = f"{formatted}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict


def _drop_color_message(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


class _AddPid:
    """With several workers, the pid tells which process served a request or logged an error.

    NOTE: read once (configure_logging runs in each worker): `os.getpid` is a system call,
    ~2% of a worker when made for every request line.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()

    def __call__(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        event_dict["pid"] = self._pid
        return event_dict


# Address candidates in free text. Not after `://` or `@`: a URL's host is a server (uvicorn's
# "running on http://…", a database), never a client. IPv6 candidates need two colons.
_IPV4_CANDIDATE = re.compile(r"(?<![\w.])(?<!://)(?<!@)(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
_IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.\[])(?<!://\[)(?<!@\[)\[?[0-9A-Fa-f]*(?::[0-9A-Fa-f.]*){2,}\]?"
)


def _anonymised_address(match: re.Match[str]) -> str:
    text = match.group()
    # uvicorn writes a client as "host:port", also for IPv6 ("::1:53122"): try with and
    # without a trailing port; what is no address either way (a time, a version) stays.
    host, separator, port = text, "", ""
    if anonymise_ip(host.strip("[]")) is None:
        host, separator, port = text.rpartition(":")
    anonymised = anonymise_ip(host.strip("[]"))
    if anonymised is None:
        return text
    if host.startswith("[") or (port and ":" in anonymised):
        anonymised = f"[{anonymised}]"  # an IPv6 address before a port reads as one
    return anonymised + separator + port


def _anonymise_foreign_addresses(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Library lines are free text: uvicorn writes a WebSocket client's full address in them."""
    event = event_dict.get("event")
    if isinstance(event, str) and any(c in event for c in ".:"):
        event = _IPV6_CANDIDATE.sub(_anonymised_address, event)
        event_dict["event"] = _IPV4_CANDIDATE.sub(_anonymised_address, event)
    return event_dict


class _Lines:
    """Where structlog's JSON lines go: stdout, with the lines an event loop logs in one turn
    written together once the turn is over.

    NOTE: a write and a flush per line was ~2% of a worker on the prediction path; under load
    a turn of the loop answers several requests. A line waits microseconds, and is lost only
    if the process is killed within that turn. Lines logged outside a running loop (threads,
    start-up, the CLI) are written at once. One pending list per thread, so loops in different
    threads never share one.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._local = threading.local()

    def msg(self, message: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(message + b"\n")
            return
        pending: list[bytes] | None = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        if not pending:
            loop.call_soon(self._flush, pending)
        pending.append(message)

    log = debug = info = warn = warning = error = critical = exception = failure = fatal = msg

    def _flush(self, pending: list[bytes]) -> None:
        pending.append(b"")
        data = b"\n".join(pending)
        pending.clear()
        self._write(data)

    def _write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()


def _orjson_bytes(obj: Any, **_kw: Any) -> bytes:
    return orjson.dumps(obj, default=str)


def _orjson_text(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _shared_processors(settings: Settings) -> list[Processor]:
    # Tracebacks become data before the Redactor runs, so a secret in an exception message is
    # masked too; never with frame locals (they hold keys, peppers, request bodies). People at
    # a console get the plain text traceback: ConsoleRenderer cannot print the dict form.
    exceptions = (
        structlog.processors.format_exc_info
        if settings.log_format == "console"
        else structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    )
    return [
        _add_request_id,
        structlog.processors.add_log_level,
        _Timestamp(),
        _AddPid(),
        _drop_color_message,
        exceptions,
        Redactor.from_settings(settings),
    ]


def _renderer(settings: Settings, *, as_bytes: bool) -> Processor:
    if settings.log_format == "console":
        return structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    if as_bytes:
        return structlog.processors.JSONRenderer(serializer=_orjson_bytes)
    return structlog.processors.JSONRenderer(serializer=_orjson_text)


def _one(lines: _Lines) -> Callable[..., _Lines]:
    """A logger factory handing every logger the same output, so lines keep their order."""
    return lambda *_args: lines


def configure_logging(settings: Settings) -> None:
    global _info_line
    level = logging.getLevelNamesMapping()[settings.log_level]
    console = settings.log_format == "console"
    processors = [*_shared_processors(settings), _renderer(settings, as_bytes=not console)]
    lines = _Lines(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout) if console else _one(lines),
        cache_logger_on_first_use=True,
    )
    _info_line = None if console or level > logging.INFO else _InfoLine(processors, lines)
    logging.config.dictConfig(stdlib_logging_config(settings))


class _InfoLine:
    """A JSON line at INFO through the configured processors, as structlog would run them."""

    def __init__(self, processors: list[Processor], lines: _Lines) -> None:
        *self._processors, self._render = processors
        self._lines = lines

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        fields["event"] = event
        event_dict: Any = fields  # each processor's answer is the next one's event dict
        for processor in self._processors:
            event_dict = processor(None, "info", event_dict)
        self._lines.msg(cast(bytes, self._render(None, "info", event_dict)))  # JSON: bytes


_info_line: _InfoLine | None = None


def log_info(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """`logger.info(event, **fields)`, the same line for half its cost (~3.5 µs of ~7): for the
    request line, the hot path's one log call. `fields` becomes the line's, and is changed.

    NOTE: structlog's bound logger copies its context and the call's keywords into a new dict,
    then runs the same processors; with JSON lines at INFO or below, they are run here directly.
    """
    if _info_line is None:
        logger.info(event, **fields)  # console lines, or INFO filtered out
    else:
        _info_line(event, fields)


def stdlib_formatter(settings: Settings | None = None) -> logging.Formatter:
    """uvicorn's and every library's records, rendered by the same structlog chain."""
    settings = settings or get_settings()
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            _anonymise_foreign_addresses,
            *_shared_processors(settings),
        ],
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
