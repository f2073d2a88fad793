"""The FastAPI application: `create_app()` is the factory uvicorn imports (`app.main:create_app`)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from app.api import docs_pages, model_router
from app.api.routes import (
    catalog,
    datasets,
    enforcement,
    evidence,
    health,
    jobs,
    keys,
    models,
    uploads,
    webhooks,
)
from app.api.security_headers import SecurityHeaders, inline_style, policy
from app.core.config import Settings, get_settings
from app.core.db import session_factory
from app.core.enforcement import Enforcement
from app.core.keys import KeyCache
from app.core.limits import Background, make_limits
from app.core.storage import ArtifactStore
from app.core.webhooks import Deliverer
from app.problems import BodyLimit, document_problems, install_problem_handlers
from app.services.evidence import Verifier
from app.services.job_events import EventWatch
from app.services.monitor import Monitor
from app.services.predictor import Predictor
from app.services.report_page import CSS as REPORT_CSS
from app.services.serving import HistoryCache, ModelCache
from app.services.sessions import SessionStore
from app.web import routes as web

DESCRIPTION = """\
Train a classifier that resists black-box distillation (CMIM), audit it the way a thief would, and
serve it exactly as audited.

1. `POST /api/v1/jobs` with the example body, `{"preset": "quick"}` (a demo on MNIST-1D that finishes in
   minutes on a CPU; `GET /api/v1/presets` lists the presets).
2. Follow `GET /api/v1/jobs/{id}/events` (Server-Sent Events) until `succeeded`.
3. Read `GET /api/v1/jobs/{id}/report.html`, download the checkpoint from `/artifacts`, and query
   the model at `POST /v2/models/{id}/infer`.

Authenticate with `Authorization: Bearer <key>` (`cmim keys create` makes one; `cmim serve` prints one).
Errors are RFC 9457 `application/problem+json`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for settings (default: from `CMIM_*` environment variables)."""
    settings = settings or get_settings()
    sessions = session_factory(settings.database_url)
    key_cache = KeyCache(sessions, settings.key_cache_seconds)
    limits = make_limits(settings.broker_url, settings.redis_prefix, sessions)
    deliverer = Deliverer(sessions, settings)
    guard = Enforcement(sessions, deliverer)
    monitor = Monitor(sessions, settings.broker_url, settings.redis_prefix, guard)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Revocations and enforcement reach this process's memory, and usage counters and alerts reach
        # the database, from here.
        guard.start()
        background = Background(
            [
                (settings.key_poll_seconds, key_cache.poll),
                (settings.key_poll_seconds, guard.poll),
                (settings.usage_flush_seconds, limits.flush),
                (settings.usage_flush_seconds, monitor.flush),
            ]
        )
        threads = [background]
        if settings.embedded:
            # Webhooks are delivered by a thread of their own (a slow receiver must not hold the counters
            # back); deployed, by `cmim notifier`.
            threads.append(Background([(settings.webhook_poll_seconds, deliverer.pump)], last_run=False))
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            for thread in threads:
                thread.stop()

    app = FastAPI(
        title="cmim",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc: app.api.docs_pages
        redoc_url=None,
    )
    app.state.settings = settings
    # Unset (never in production: see Settings), a secret of this process's own: fine for one process.
    secret = settings.session_secret.encode() if settings.session_secret else secrets.token_bytes(32)
    app.state.web_sessions = SessionStore(secret, sessions)
    app.state.sessions = sessions
    app.state.events = EventWatch(sessions, settings.stream_poll_seconds, settings.max_streams_per_key)
    app.state.upload_slots = threading.BoundedSemaphore(settings.max_concurrent_uploads)
    app.state.store = ArtifactStore.from_settings(settings)
    app.state.models = ModelCache(settings.model_cache_size)
    app.state.keys = key_cache
    app.state.limits = limits
    app.state.monitor = monitor
    app.state.enforcement = guard
    app.state.histories = HistoryCache(settings.policy_history_cache_size)
    app.state.verifier = Verifier(settings, app.state.store)  # remote verifications, one pool per process
    state = app.state
    app.state.predictor = Predictor(
        settings, sessions, state.store, state.models, state.histories, limits, monitor, guard
    )
    install_problem_handlers(app)
    document_problems(app)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_json_body_bytes, max_upload_bytes=settings.upload_max_bytes
    )
    # Outside BodyLimit, so that its refusals carry the headers too. The report page is one self-contained
    # file (its stylesheet inline), so that it can be saved: that stylesheet, and no other, may be inline.
    app.add_middleware(SecurityHeaders, csp=policy(styles=[inline_style(REPORT_CSS)]))

    app.include_router(models.v2)  # first: routes are matched in order, and these are the hot ones
    api = APIRouter(prefix="/api/v1")
    # Everything under /api/v1/models is one router: serving, uploads and enforcement add their routes to it.
    assert all(m.router is model_router.router for m in (models, uploads, enforcement))
    for module in (model_router, jobs, datasets, evidence, keys, catalog, webhooks):
        api.include_router(module.router)
    api.include_router(jobs.presets)
    app.include_router(api)
    app.include_router(health.router)
    app.include_router(health.v2)
    web.mount(app)
    docs_pages.mount(app)  # /docs and /redoc: offline, no inline script
    openapi = app.openapi

    def documented() -> dict[str, Any]:
        if app.openapi_schema is None:
            models.document_bodies(openapi())
        return openapi()

    app.openapi = documented  # type: ignore[method-assign]
    return app
