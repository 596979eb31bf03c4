"""`tenantserve serve` with one extra route that fails on purpose, for the error-path tests.

No production route fails on demand, yet tests must show what an unexpected exception looks
like to a client (a bare problem+json 500) and in the logs (a masked traceback as data). Run
as `python -m tests.failing_server` with one worker: uvicorn then builds the app in this
process, from the factory patched below.
"""

from __future__ import annotations

from fastapi import FastAPI

import service.main
from service.cli import main

# Shaped like a real key (never issued): the log must mask it, the client must never see it.
LEAKED_KEY = "tsk_testtesttest_leakedsecretleakedsecretleakedse000000"
BOOM_PATH = "/v1/_test/boom"
_create_app = service.main.create_app


async def boom() -> None:
    raise RuntimeError(f"unexpected failure while handling key {LEAKED_KEY}")


def create_failing_app() -> FastAPI:
    app = _create_app()
    app.add_api_route(BOOM_PATH, boom, include_in_schema=False)
    return app


if __name__ == "__main__":
    service.main.create_app = create_failing_app  # type: ignore[assignment]
    main(["serve"])
