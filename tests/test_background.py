"""The threads behind a worker's event loop never preempt it (tenants.background)."""

from __future__ import annotations

import os
import sys

import pytest

from tenants.background import background_threads


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")
def test_background_threads_run_as_batch_threads_and_leave_the_caller_as_it_was() -> None:
    with background_threads("test", max_workers=1) as pool:
        policy = pool.submit(os.sched_getscheduler, 0).result()
    assert policy == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
