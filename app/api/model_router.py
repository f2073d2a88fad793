"""The one router under /api/v1/models: serving's simple predict route (`models`), uploaded models
(`uploads`), and enforcement and alerts (`enforcement`) add their routes to it, each with its own tags."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/models")
