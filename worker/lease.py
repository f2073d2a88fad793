"""A claimed job's lease: the claim, the heartbeat that renews it, and the fenced progress hooks.

Every write of a running job is fenced on its claim (worker id + attempt): a worker that lost its lease
can never write over a newer attempt. The heartbeat thread renews the lease every `heartbeat_seconds`
whatever an epoch takes, so a slow but live job is never taken over, while a dead worker's lease runs
out within `lease_seconds`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.core.models import JobStatus
from app.core.outage import retry_outage
from app.core.queue import Claim, LeaseLost, append_event, renew_lease, transition
from ml.audit import AuditProgress
from ml.train import EpochReport, TrainingCancelled

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0  # audit progress: at most one event (and lease renewal) per this many seconds
T = TypeVar("T")


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobContext:
    """What the running stages need: settings, the claim, the fenced progress hooks and the heartbeat."""

    def __init__(self, settings: Settings, claim: Claim) -> None:
        self.settings, self.claim = settings, claim
        self.work = Path(settings.work_dir) / str(claim.job_id)
        self._last_progress = 0.0
        self._stop = threading.Event()
        self._lost = self._cancel = False
        self._beat = threading.Thread(target=self._heartbeat_loop, name="cmim-heartbeat", daemon=True)

    def __enter__(self) -> JobContext:
        self._beat.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._beat.join()

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.settings.database_url)

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """fn() retried through database outages for up to `infra_retry_seconds`."""
        return retry_outage(fn, self.settings.infra_retry_seconds, f"job {self.claim.job_id}: {what}")

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with self.session() as s:
                    self._cancel = renew_lease(s, self.claim, self.settings.lease_seconds) or self._cancel
            except LeaseLost:
                self._lost = True
                return
            except Exception as e:  # noqa: BLE001 - an outage is retried at the next beat
                log.warning("job %s: heartbeat failed (%s: %s)", self.claim.job_id, type(e).__name__, e)

    def _checkpoint(self, kind: str, data: dict[str, Any]) -> None:
        """An event and a renewed lease; raises LeaseLost or TrainingCancelled as the job's row says."""
        if self._lost:
            raise LeaseLost(f"job {self.claim.job_id}: lease of attempt {self.claim.attempt} is gone")

        def write() -> bool:
            with self.session() as s:
                append_event(s, self.claim.job_id, kind, data | {"attempt": self.claim.attempt})
                return renew_lease(s, self.claim, self.settings.lease_seconds)

        if self.retrying(write, kind) or self._cancel:
            raise TrainingCancelled(f"job {self.claim.job_id}: cancellation requested")

    def check(self) -> None:
        """Renew the lease now; raises LeaseLost or TrainingCancelled as the job's row says."""

        def write() -> bool:
            with self.session() as s:
                return renew_lease(s, self.claim, self.settings.lease_seconds)

        if self.retrying(write, "renew the lease") or self._cancel:
            raise TrainingCancelled(f"job {self.claim.job_id}: cancellation requested")

    def on_epoch(self, report: EpochReport) -> None:
        """Per epoch: an event, a renewed lease, and the cancel check (TrainingCancelled stops training)."""
        self._checkpoint("epoch", report.model_dump(mode="json"))

    def on_progress(self, p: AuditProgress) -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_EVERY_S and p.done < p.total:
            return
        self._last_progress = now
        self._checkpoint("progress", p.model_dump(mode="json"))

    def warn(self, stage: str, message: str) -> None:
        """A warning event on the job (not fenced: it changes nothing the claim guards)."""
        with self.session() as s:
            append_event(s, self.claim.job_id, "warning", {"stage": stage, "message": message})

    def set_status(self, status: JobStatus, **extra: Any) -> None:
        def write() -> None:
            with self.session() as s:
                transition(s, self.claim, status, **extra)

        self.retrying(write, f"set {status.value}")


def finish(ctx: JobContext, status: JobStatus, error: str | None = None) -> JobStatus:
    """Record a final status, unless the claim is gone (then a newer attempt owns the job)."""
    try:
        ctx.set_status(status, error=error)
    except LeaseLost:
        log.warning("job %s: lease lost before recording %s", ctx.claim.job_id, status.value)
    return status
