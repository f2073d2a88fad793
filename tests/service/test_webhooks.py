"""Owner webhooks on SQLite and PostgreSQL: registering, listing and deleting them, the signature a receiver
checks, and deliveries by the embedded service's thread to a real local receiver, retried with back-off
while it is down and logged (the deployed notifier's Celery task: test_enforcement.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_helpers import Receiver, assert_problem

from app.core.config import Settings
from app.core.db import session_scope
from app.core.webhooks import TOLERANCE_SECONDS, queue_event, sign, verify
from app.main import create_app


def test_a_signature_holds_for_its_body_and_secret_while_fresh() -> None:
    body, now = b'{"type":"alert"}', int(time.time())
    header = sign("whsec_a", now, body)
    # the receiver's recipe, written out: HMAC-SHA256 over "<t>.<body>", hex, in v1
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    assert v1 == hmac.new(b"whsec_a", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert verify("whsec_a", header, body)
    assert not verify("whsec_a", header, body + b" ")
    assert not verify("whsec_b", header, body)
    assert not verify("whsec_a", sign("whsec_a", now - TOLERANCE_SECONDS - 1, body), body)  # replayed
    assert not verify("whsec_a", "v1=" + v1, body) and not verify("whsec_a", "", body)


def test_webhooks_are_registered_listed_and_deleted(client, caller, other_caller, new_caller) -> None:
    url = "http://93.184.216.34/hook"  # a public address: no resolver needed
    made = client.post("/api/v1/webhooks", json={"url": url, "description": "ops"}, headers=caller.headers)
    assert made.status_code == 201, made.text
    hook = made.json()
    assert hook["secret"].startswith("whsec_") and hook["url"] == url and hook["deleted_at"] is None
    listed = client.get("/api/v1/webhooks", headers=caller.headers).json()
    assert [h["id"] for h in listed["items"]] == [hook["id"]] and "secret" not in listed["items"][0]
    assert client.get("/api/v1/webhooks", headers=other_caller.headers).json()["items"] == []
    for bad, why in (
        ("ftp://example.org/x", "http"),
        ("http://user:pw@93.184.216.34/", "credentials"),
        ("http://127.0.0.1:8000/", "CMIM_WEBHOOK_PRIVATE_TARGETS"),  # the service's own backends
        ("http://169.254.169.254/latest", "non-public"),  # cloud metadata
        ("http://93.184.216.34/a b", "ASCII"),
    ):
        body = assert_problem(client.post("/api/v1/webhooks", json={"url": bad}, headers=caller.headers), 422)
        assert why in body["detail"], body
    predict_only = new_caller(owner_id=caller.owner_id, scopes=["models:predict"])
    assert_problem(client.get("/api/v1/webhooks", headers=predict_only.headers), 403)
    # another owner's webhook is a 404, as a missing one
    assert_problem(client.delete(f"/api/v1/webhooks/{hook['id']}", headers=other_caller.headers), 404)
    assert_problem(client.get(f"/api/v1/webhooks/{hook['id']}/deliveries", headers=other_caller.headers), 404)
    assert client.delete(f"/api/v1/webhooks/{hook['id']}", headers=caller.headers).status_code == 204
    assert client.get("/api/v1/webhooks", headers=caller.headers).json()["items"] == []
    log = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries", headers=caller.headers)
    assert log.status_code == 200 and log.json()["items"] == []  # a deleted webhook's log stays readable
    other = other_caller.headers
    more = [client.post("/api/v1/webhooks", json={"url": url}, headers=other) for _ in range(11)]
    assert [r.status_code for r in more[:10]] == [201] * 10
    assert "delete one first" in assert_problem(more[10], 409)["detail"]


@pytest.fixture
def delivering(settings: Settings) -> Iterator[TestClient]:
    """The embedded service delivering to local receivers, quickly retried: 0.2 s, then 0.4 s, ..."""
    fast = settings.model_copy(
        update={
            "webhook_private_targets": True,
            "webhook_backoff_seconds": 0.2,
            "webhook_backoff_max_seconds": 0.4,
            "webhook_poll_seconds": 0.05,
            "webhook_max_attempts": 4,
        }
    )
    with TestClient(create_app(fast)) as c:
        yield c


def wait_for(client: TestClient, headers: dict[str, str], hook: str, done: Any, timeout: float = 15) -> dict:
    """The webhook's newest delivery, once done(delivery) holds."""
    deadline = time.monotonic() + timeout
    while True:
        items = client.get(f"/api/v1/webhooks/{hook}/deliveries", headers=headers).json()["items"]
        if items and done(items[0]):
            return items[0]
        assert time.monotonic() < deadline, items
        time.sleep(0.05)


def test_a_delivery_is_signed_and_retried_while_the_receiver_is_down(delivering, caller) -> None:
    receiver = Receiver()  # down at first: connections refused
    made = delivering.post("/api/v1/webhooks", json={"url": receiver.url}, headers=caller.headers).json()
    data = {"alert_id": str(uuid.uuid4()), "kind": "key"}
    with session_scope(delivering.app.state.settings.database_url) as s:
        (delivery,) = queue_event(s, caller.owner_id, "alert", data)
    failing = wait_for(delivering, caller.headers, made["id"], lambda d: d["attempts"] >= 2)
    assert failing["status"] == "pending" and failing["log"][0]["error"] and failing["next_attempt_at"]
    receiver.start()
    try:
        done = wait_for(delivering, caller.headers, made["id"], lambda d: d["status"] == "delivered")
    finally:
        receiver.stop()
    assert done["id"] == str(delivery) and done["attempts"] >= 3 and done["delivered_at"]
    assert done["log"][-1]["status_code"] == 204 and done["log"][-1]["error"] is None
    assert all(a["error"] for a in done["log"][:-1])  # each failed attempt says why
    (headers, body), *_ = receiver.received
    assert verify(made["secret"], headers["x-cmim-signature"], body)
    assert headers["x-cmim-event"] == "alert" and headers["x-cmim-delivery"] == str(delivery)
    sent = json.loads(body)
    assert sent == done["payload"] and sent["type"] == "alert" and sent["data"] == data


def test_a_delivery_fails_after_its_last_attempt_or_when_its_webhook_is_deleted(delivering, caller) -> None:
    gone = Receiver()  # never started
    kept, dropped = (
        delivering.post("/api/v1/webhooks", json={"url": gone.url}, headers=caller.headers).json()
        for _ in range(2)
    )
    url = delivering.app.state.settings.database_url
    with session_scope(url) as s:
        assert len(queue_event(s, caller.owner_id, "enforcement", {"actions": []})) == 2
    assert delivering.delete(f"/api/v1/webhooks/{dropped['id']}", headers=caller.headers).status_code == 204
    with session_scope(url) as s:
        assert len(queue_event(s, caller.owner_id, "enforcement", {"actions": []})) == 1  # live ones only
    failed = wait_for(delivering, caller.headers, kept["id"], lambda d: d["status"] == "failed")
    assert failed["attempts"] == 4 and failed["next_attempt_at"] is None and len(failed["log"]) == 4
    stopped = wait_for(delivering, caller.headers, dropped["id"], lambda d: d["status"] == "failed")
    assert stopped["log"][-1]["error"] == "webhook deleted"
