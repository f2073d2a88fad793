"""The notifier (`cmim notifier`): a Celery worker that delivers owner webhooks from their own queue.

Apart from the job workers, so that no delivery waits behind a training job. Each task attempts one
delivery (`app.core.webhooks.Deliverer.attempt`); a failed attempt sends itself again after the back-off
(Celery's retry with a countdown). A thread sweeps for deliveries whose next try is a minute overdue (a
message lost with a broker that restarted without persistence) and sends them again: the delivery row, not
the message, is the truth, and its claim keeps two tasks from posting one delivery at once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery import Task, signals

from app.core.db import session_factory
from app.core.webhooks import WEBHOOK_TASK, Deliverer
from worker.celery_app import celery_app, settings

log = logging.getLogger(__name__)
OVERDUE_SECONDS = 60.0  # a pending delivery this late has lost its message

deliverer = Deliverer(session_factory(settings.database_url), settings)


@celery_app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)
def deliver_webhook(self: Task, delivery_id: str) -> None:
    delay = deliverer.attempt(uuid.UUID(delivery_id))
    if delay is not None:
        raise self.retry(countdown=delay, queue=settings.webhook_queue)


def _sweep(stop: threading.Event) -> None:
    while not stop.wait(settings.webhook_poll_seconds):
        try:
            deliverer.send(deliverer.due(OVERDUE_SECONDS))
        except Exception as e:  # noqa: BLE001 - a database outage: the next sweep tries again
            log.warning("webhook sweep failed: %s: %s", type(e).__name__, e)


_stop = threading.Event()


@signals.worker_ready.connect
def _start_sweep(**_: Any) -> None:
    threading.Thread(target=_sweep, args=(_stop,), name="cmim-webhook-sweep", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_sweep(**_: Any) -> None:
    _stop.set()
