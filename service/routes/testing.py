"""Routes that exist only when `TENANTSERVE_ENV=test`: failures on purpose, for the error path.

No production route fails on demand, yet tests must show what an unexpected exception looks
like to a client (a bare problem+json 500) and in the logs (a masked traceback as data).
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/_test", include_in_schema=False)

# Shaped like a real key (never issued): the log must mask it, the client must never see it.
LEAKED_KEY = "tsk_testtesttest_leakedsecretleakedsecretleakedse000000"


@router.get("/boom")
async def boom() -> None:
    raise RuntimeError(f"unexpected failure while handling key {LEAKED_KEY}")
