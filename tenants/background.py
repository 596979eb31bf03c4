"""Threads that work behind a worker's event loop: the journal's fsyncs, the usage writes, the
model's larger calls.

NOTE: each runs as `SCHED_BATCH` (Linux). A normal thread that wakes (its fsync returned, a
job arrived) preempts whatever runs on its core, most often the event loop's own thread, which
then loses its caches and waits for a core again. A batch thread is never woken into a
preemption: it runs when the core is next free, milliseconds at most, with the same share of
the CPU as before. In a 2-worker run at 64 connections the loop's thread was preempted 1.1
times a request instead of 1.6, and a request cost ~5% less CPU (perf/README.md, "Session 9").
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor


def yield_to_the_loop() -> None:
    """Make the calling thread one that never preempts the loop when it wakes."""
    # Allowed without privileges; where it is not (another OS, a strict sandbox), no matter.
    if hasattr(os, "sched_setscheduler"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: this thread


def background_threads(name: str, *, max_workers: int | None = None) -> ThreadPoolExecutor:
    """A pool of threads named `name_N`, none of whose wake-ups preempts the event loop."""
    return ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix=name, initializer=yield_to_the_loop
    )
