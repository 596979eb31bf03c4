"""Identifiers: random ones for rows admins create, cheap unique ones for the hot path."""

from __future__ import annotations

import itertools
import os
import uuid


def new_id() -> str:
    return uuid.uuid4().hex


class _ProcessIds:
    """Unique ids without a system call: a random per-process prefix and a counter.

    NOTE: uuid4 reads the kernel's random source each time; on the request path, twice per
    request (request id, usage record id), that was a measurable share of the CPU.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


fast_id = _ProcessIds()
