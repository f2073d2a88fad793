"""The FastAPI application: `create_app()` is the factory uvicorn imports (`app.main:create_app`)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from app.api.inference import HistoryCache, ModelCache, RateLimiter
from app.api.routes import catalog, datasets, health, jobs, keys, models, uploads
from app.core.config import Settings, get_settings
from app.core.db import session_factory
from app.core.storage import ArtifactStore
from app.problems import install_problem_handlers

DESCRIPTION = """\
Train a classifier that resists black-box distillation (CMIM), audit it the way a thief would, and
serve it exactly as audited.

1. `POST /api/v1/jobs` with the example body (a demo on MNIST-1D that finishes in minutes on a CPU).
2. Follow `GET /api/v1/jobs/{id}/events` (Server-Sent Events) until `succeeded`.
3. Read `GET /api/v1/jobs/{id}/report.html`, download the checkpoint from `/artifacts`, and query
   the model at `POST /v2/models/{id}/infer`.

Authenticate with `Authorization: Bearer <key>` (`cmim keys create` makes one; `cmim serve` prints one).
Errors are RFC 9457 `application/problem+json`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for settings (default: from `CMIM_*` environment variables)."""
    settings = settings or get_settings()
    app = FastAPI(title="cmim", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.sessions = session_factory(settings.database_url)
    app.state.store = ArtifactStore(settings.artifact_url, settings.cache_dir)
    app.state.models = ModelCache(settings.model_cache_size)
    app.state.rate_limiter = RateLimiter()
    app.state.histories = HistoryCache(settings.policy_history_cache_size)
    install_problem_handlers(app)

    api = APIRouter(prefix="/api/v1")
    for module in (jobs, datasets, uploads, keys, catalog):
        api.include_router(module.router)
    api.include_router(models.simple)
    app.include_router(api)
    app.include_router(models.v2)
    app.include_router(health.router)
    return app
