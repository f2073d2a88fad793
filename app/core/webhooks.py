"""Owner webhooks: alerts and enforcement actions POSTed to the owner's URLs, signed, retried, logged.

Each event becomes one delivery row per live webhook of the owner, written in the transaction that
records the event (the table is the outbox: nothing is lost if the sender dies). A delivery is attempted
by `Deliverer.attempt`: deployed, by the Celery task `cmim.deliver_webhook` on the webhook queue (`cmim
notifier`), which retries with exponential back-off; embedded, by a background thread of the API process
that attempts every due delivery (`Deliverer.pump`). An attempt first claims the row (moves its next try
past the attempt's timeout), so that two senders never post one delivery at once.

Signing, as Stripe and GitHub do: `X-Cmim-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>" keyed by the webhook's secret>`; the receiver recomputes it and refuses an old `t`
(`verify` is the recipe, and docs/enforcement.md gives it for receivers).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.models import Webhook, WebhookDelivery, utcnow
from app.core.queue import broker_client

log = logging.getLogger(__name__)

WEBHOOK_TASK = "cmim.deliver_webhook"
SIGNATURE_HEADER = "X-Cmim-Signature"
EVENT_HEADER = "X-Cmim-Event"
DELIVERY_HEADER = "X-Cmim-Delivery"
SECRET_PREFIX = "whsec_"
TOLERANCE_SECONDS = 300  # a receiver refuses a signature older than this (a replayed delivery)
MAX_URL = 2000
LOG_KEPT = 50  # attempts kept in a delivery's log (the attempt count keeps counting)


def new_secret() -> str:
    """A webhook's signing secret: shown to its owner once, kept to sign with."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, now: float | None = None) -> bool:
    """What a receiver does: the header's v1 matches the body under the secret, and its t is recent."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    stamp = parts.get("t", "")
    if not stamp.isdigit() or abs((now or time.time()) - int(stamp)) > TOLERANCE_SECONDS:
        return False
    return hmac.compare_digest(sign(secret, int(stamp), body), f"t={stamp},v1={parts.get('v1', '')}")


def check_url(url: str, allow_private: bool) -> str:
    """The URL if deliveries may go there; ValueError saying why not. Without `allow_private`
    (CMIM_WEBHOOK_PRIVATE_TARGETS) every address the host resolves to must be public: a webhook must
    not make the service post to its own database, broker or cloud metadata."""
    parts = urlsplit(url)
    if len(url) > MAX_URL:
        raise ValueError(f"the URL is longer than {MAX_URL} characters")
    if any(not "!" <= c <= "~" for c in url):
        raise ValueError("the URL must be printable ASCII without spaces: percent-encode anything else")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("give an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL must not carry credentials: the signature authenticates deliveries")
    if allow_private:
        return url
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise ValueError(f"the host {parts.hostname!r} does not resolve ({e})") from None
    private = sorted(a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_global)
    if private:
        raise ValueError(
            f"the host {parts.hostname!r} resolves to non-public address(es) {', '.join(private)}; "
            "the operator may allow them (CMIM_WEBHOOK_PRIVATE_TARGETS)"
        )
    return url


def queue_event(session: Session, owner_id: uuid.UUID, event: str, data: dict[str, Any]) -> list[uuid.UUID]:
    """One pending delivery of the event per live webhook of the owner (in the caller's transaction)."""
    hooks = session.scalars(
        select(Webhook.id).where(Webhook.owner_id == owner_id, Webhook.deleted_at.is_(None))
    )
    now, ids = utcnow(), []
    for hook in hooks:
        ident = uuid.uuid4()
        payload = {"id": str(ident), "type": event, "created_at": now.isoformat(), "data": data}
        session.add(
            WebhookDelivery(
                id=ident,
                webhook_id=hook,
                owner_id=owner_id,
                event=event,
                payload=payload,
                status="pending",
                attempts=0,
                log=[],
                next_attempt_at=now,
                created_at=now,
            )
        )
        ids.append(ident)
    return ids


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next try after `attempts` failed ones: base, 2 base, 4 base, ... at most cap."""
    return min(base * 2 ** (attempts - 1), cap)


class Deliverer:
    """Attempts deliveries (the Celery task and the embedded thread both call `attempt`) and sends new
    ones to whichever of them runs here."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions, self.settings = sessions, settings

    def send(self, ids: list[uuid.UUID]) -> None:
        """Hand new deliveries to the Celery task (deployed); embedded, the API's thread finds them due.
        A message the broker did not take is sent again by the notifier's sweep (`due`)."""
        if self.settings.embedded or not ids:
            return
        client = broker_client(self.settings.broker_url)  # type: ignore[arg-type]
        for ident in ids:
            try:
                client.send_task(
                    WEBHOOK_TASK, args=[str(ident)], queue=self.settings.webhook_queue, retry=False
                )
            except Exception as e:  # noqa: BLE001 - the row is the truth; the sweep sends it later
                log.warning("webhook delivery %s not sent to the broker (%s: %s)", ident, type(e).__name__, e)

    def due(self, overdue_seconds: float = 0.0, limit: int = 100) -> list[uuid.UUID]:
        """Pending deliveries whose next try was due `overdue_seconds` ago or earlier, oldest first."""
        cutoff = utcnow() - timedelta(seconds=overdue_seconds)
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(WebhookDelivery.id)
                    .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= cutoff)
                    .order_by(WebhookDelivery.next_attempt_at)
                    .limit(limit)
                )
            )

    def pump(self) -> None:
        """Embedded: attempt every due delivery (run by a background thread of the API process)."""
        for ident in self.due():
            self.attempt(ident)

    def _claim(self, ident: uuid.UUID) -> tuple[str, str, dict[str, Any], str] | None:
        """Claim a due delivery: (url, secret, payload, event), or None when it is not due or not pending.
        A deleted webhook's delivery fails here."""
        now = utcnow()
        held = now + timedelta(seconds=self.settings.webhook_timeout_seconds + 30)
        with self.sessions() as session, session.begin():
            claimed = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == ident,
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                )
                .values(next_attempt_at=held)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None
            row = session.get(WebhookDelivery, ident)
            hook = session.get(Webhook, row.webhook_id) if row else None
            if row is None or hook is None:
                return None
            if hook.deleted_at is not None:
                row.status, row.next_attempt_at = "failed", None
                row.log = [*row.log, {"at": now.isoformat(), "status_code": None, "error": "webhook deleted"}]
                return None
            return hook.url, hook.secret, row.payload, row.event

    def attempt(self, ident: uuid.UUID) -> float | None:
        """Try one delivery once if it is due; the seconds until its next try when it failed and may be
        tried again, else None (delivered, failed for good, or not ours to try now)."""
        claimed = self._claim(ident)
        if claimed is None:
            return None
        url, secret, payload, event = claimed
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "cmim-webhooks",
            SIGNATURE_HEADER: sign(secret, int(time.time()), body),
            EVENT_HEADER: event,
            DELIVERY_HEADER: str(ident),
        }
        started, code, error = time.monotonic(), None, None
        try:
            check_url(url, self.settings.webhook_private_targets)  # again: DNS may have changed since
            response = httpx.post(
                url, content=body, headers=headers, timeout=self.settings.webhook_timeout_seconds
            )
            code = response.status_code
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except (httpx.HTTPError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        entry = {
            "at": utcnow().isoformat(),
            "status_code": code,
            "error": error,
            "ms": round((time.monotonic() - started) * 1000),
        }
        return self._record(ident, entry)

    def _record(self, ident: uuid.UUID, entry: dict[str, Any]) -> float | None:
        s = self.settings
        with self.sessions() as session, session.begin():
            row = session.get(WebhookDelivery, ident)
            if row is None:
                return None
            row.attempts += 1
            row.log = [*row.log, entry][-LOG_KEPT:]
            if entry["error"] is None:
                row.status, row.delivered_at, row.next_attempt_at = "delivered", utcnow(), None
                return None
            if row.attempts >= s.webhook_max_attempts:
                row.status, row.next_attempt_at = "failed", None
                return None
            delay = backoff(row.attempts, s.webhook_backoff_seconds, s.webhook_backoff_max_seconds)
            row.next_attempt_at = utcnow() + timedelta(seconds=delay)
            return delay
