"""Liveness and readiness, also as the Open Inference Protocol v2 server endpoints."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.core.queue import broker_reachable
from app.problems import RETRY_AFTER_S, Problem
from app.services.access import SessionDep, SettingsDep

router = APIRouter(tags=["health"])
v2 = APIRouter(prefix="/v2", tags=["inference (KServe v2)"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _checks(session: SessionDep, settings: SettingsDep) -> dict[str, str]:
    """The database and (when configured) the broker, each "ok" or why not; 503 when any is not."""
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
    return checks


@router.get("/readyz", summary="The database and (when configured) the broker answer")
async def readyz(checks: Annotated[dict[str, str], Depends(_checks)]) -> dict[str, str]:
    return {"status": "ok", **checks}


@v2.get("", summary="Server metadata (v2)")
def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "cmim", "version": request.app.version, "extensions": ["binary_tensor_data"]}


@v2.get("/health/live", summary="200 while the server is up (v2)")
def live() -> dict[str, bool]:
    return {"live": True}


@v2.get("/health/ready", summary="200 when the server can answer: database and broker up (v2)")
async def server_ready(checks: Annotated[dict[str, str], Depends(_checks)]) -> dict[str, Any]:
    return {"ready": True, **checks}
