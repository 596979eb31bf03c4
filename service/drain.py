"""A drain a load balancer can follow: on SIGTERM, unready first, stop accepting later.

uvicorn stops accepting the moment SIGTERM arrives. A load balancer only learns of it at its
next health check, so requests still sent meanwhile would fail. Instead `/ready` turns 503 at
once and the worker keeps serving for `TENANTSERVE_SHUTDOWN_DELAY_S`; then uvicorn's own
handler runs: it stops accepting, finishes in-flight requests, and the lifespan writes usage out.
With several workers the supervisor forwards SIGTERM to each, so each drains the same way.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import threading
from types import FrameType

import structlog

from service.resources import Resources

log = structlog.get_logger("tenantserve.drain")


def delay_shutdown(resources: Resources, delay_s: float) -> None:
    """Put our SIGTERM handler in front of uvicorn's (installed before the lifespan runs)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals are the main thread's: e.g. under a test client, nothing to drain
    stop = signal.getsignal(signal.SIGTERM)
    if not callable(stop):
        return
    loop = asyncio.get_running_loop()

    def start_draining(sig: int, frame: FrameType | None) -> None:
        log.warning("draining", shutdown_delay_s=delay_s)
        loop.call_later(delay_s, stop, sig, frame)

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if resources.draining:
            return  # already draining: a repeated SIGTERM changes nothing
        resources.draining = True  # from now on /ready answers 503
        # The rest on the loop, not inside the signal handler; in a context of its own, not
        # that of whatever request the signal interrupted (its request id would be logged).
        loop.call_soon_threadsafe(start_draining, sig, frame, context=contextvars.Context())

    signal.signal(signal.SIGTERM, on_sigterm)
