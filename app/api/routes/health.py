"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, SettingsDep
from app.core.queue import broker_reachable
from app.problems import RETRY_AFTER_S, Problem

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database and (when configured) the broker answer")
async def readyz(session: SessionDep, settings: SettingsDep) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        await run_in_threadpool(lambda: session.execute(text("SELECT 1")))
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001 - readiness reports any failure
        checks["database"] = f"unreachable: {type(e).__name__}"
    if not settings.embedded:
        checks["broker"] = "ok" if await run_in_threadpool(broker_reachable, settings) else "unreachable"
    if any(v != "ok" for v in checks.values()):
        detail = "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items())
        raise Problem(503, detail, headers={"Retry-After": str(RETRY_AFTER_S)}, checks=checks)
    return {"status": "ok", **checks}
