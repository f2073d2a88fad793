"""Enforcement: the monitor's alerts act on the keys they name. Deployed (two uvicorn replicas over Redis and
PostgreSQL, and `cmim notifier` delivering webhooks): a replayed extraction over 16 keys is suspended on
both replicas within a second of its alert, the owner reinstates a key and it answers again, the owner's
webhook receiver gets signed deliveries though it was down at first, and an honest client resending an
input is never suspended. Embedded (one process on SQLite): the dashboard's review list, throttle and
probation, and the policy's API."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import torch
from service_helpers import (
    Receiver,
    Trained,
    assert_problem,
    copy_job,
    job_body,
    service_settings,
)
from sqlalchemy import select
from test_dashboard_session import ORIGIN, sign_in
from test_e2e import Stack, base_env
from test_monitor_api import FAST
from test_predict_scale import UVICORN, v2_body

from app.core.db import session_scope
from app.core.keys import create_api_key, find_api_key
from app.core.migrate import upgrade
from app.core.models import Job, MonitorAlert
from ml.data import load_dataset
from ml.monitor_sim import fm_edge_stream

SUSPENDED = "urn:cmim:problem:key-suspended"
DATA = load_dataset(
    "mnist1d", num_train=500, num_test=500
)  # the tiny job's data: the thief holds its train split


def key_id(database_url: str, headers: dict[str, str]) -> str:
    with session_scope(database_url) as s:
        return str(find_api_key(s, headers["Authorization"].split()[1]).id)


def attack(queries: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The audit's fm_edge queries (4 epochs of its 500 training inputs per 2000), numbered batches of 50."""
    return enumerate(fm_edge_stream(DATA, queries, seed=0, batch_size=50))


def replay(
    send: Callable[[int, int, torch.Tensor], Any],
    keys: int,
    stream: Iterator[tuple[int, torch.Tensor]],
    until: Callable[[], bool] = lambda: False,
    stopped: dict[int, dict[str, Any]] | None = None,
) -> dict[int, dict[str, Any]]:
    """Batch j of the stream sent by key j mod `keys` as request j, until the stream ends or `until()`
    holds; a key sends nothing more once refused: suspended (403) or out of budget (429). Returns the
    refusals (key -> problem), `stopped` included."""
    stopped = {} if stopped is None else stopped
    for j, x in stream:
        k = j % keys
        if k in stopped:
            continue
        r = send(j, k, x)
        if r.status_code in (403, 429):
            stopped[k] = assert_problem(r, r.status_code)
            assert r.status_code == 429 or stopped[k]["type"] == SUSPENDED and stopped[k]["alert_id"], r.text
        else:
            assert r.status_code == 200, r.text
        if until():
            break
    return stopped


# ---------------------------------------------------------------- deployed


class Deployed:
    """Two API replicas and the notifier over one PostgreSQL and Redis, and an owner with a trained model."""

    def __init__(self, owner: Trained, stacks: list[Stack]) -> None:
        self.owner, self.stacks = owner, stacks
        self.url = owner.settings.database_url
        self.clients = [httpx.Client(base_url=s.base, timeout=30) for s in stacks]

    def model(self) -> str:
        """A fresh model id for one checkpoint: its monitor starts from nothing."""
        return str(copy_job(self.url, uuid.UUID(self.owner.job_id)))

    def infer(self, replica: int, model: str, headers: dict[str, str], x: torch.Tensor) -> httpx.Response:
        return self.clients[replica % 2].post(f"/v2/models/{model}/infer", json=v2_body(x), headers=headers)

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.clients[0].request(method, f"/api/v1{path}", headers=self.owner.headers, **kw)


@pytest.fixture(scope="module")
def deployed(pg_databases, redis_url, tmp_path_factory) -> Iterator[Deployed]:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("enforcement")
    url = pg_databases.create()
    upgrade(url)
    prefix = f"cmim-test-{uuid.uuid4().hex[:8]}"  # the shared Redis: our keys and our queue only
    owner = Trained(service_settings(url, tmp, broker_url=redis_url, redis_prefix=prefix), tmp)
    owner.job_id = owner.submit(job_body(**FAST))
    env = base_env(tmp) | {
        "CMIM_DATABASE_URL": url,
        "CMIM_BROKER_URL": redis_url,
        "CMIM_REDIS_PREFIX": prefix,
        "CMIM_RATE_LIMIT_PER_MINUTE": "100000",
        "CMIM_PREDICT_MAX_BATCH": "64",
        "CMIM_USAGE_FLUSH_SECONDS": "0.2",
        "CMIM_WEBHOOK_QUEUE": f"{prefix}-webhooks",
        "CMIM_WEBHOOK_PRIVATE_TARGETS": "true",  # the receiver is on this host
        "CMIM_WEBHOOK_BACKOFF_SECONDS": "0.3",
        "CMIM_WEBHOOK_BACKOFF_MAX_SECONDS": "1",
    }
    stacks = [Stack(env, tmp) for _ in range(2)]
    try:
        stacks[0].start("notifier", "-m", "worker.cli", "notifier", "-c", "2")
        for i, stack in enumerate(stacks):
            stack.wait_healthy(stack.start(f"api-{i}", *UVICORN, "--port", str(stack.port)))
        yield Deployed(owner, stacks)
    finally:
        for stack in stacks:
            stack.close()
        client = redis.Redis.from_url(redis_url)
        for name in client.scan_iter(f"*{prefix}*"):  # ours only; the shared Redis is never flushed
            client.delete(name)


def refused_everywhere(
    d: Deployed, model: str, headers: list[dict[str, str]], deadline: float
) -> dict[tuple[int, int], float]:
    """Probe each key on both replicas until it is refused there; (key, replica) -> when (time.time())."""
    probe = torch.randn(1, 1, 40)
    when: dict[tuple[int, int], float] = {}
    while len(when) < 2 * len(headers) and time.time() < deadline:
        for k, h in enumerate(headers):
            for replica in (0, 1):
                if (k, replica) not in when and d.infer(replica, model, h, probe).status_code == 403:
                    when[(k, replica)] = time.time()
    return when


def test_a_16_key_extraction_is_suspended_on_both_replicas_and_the_owner_is_told(deployed: Deployed) -> None:
    d = deployed
    model = d.model()
    receiver = Receiver()  # down until the deliveries have failed
    hook = d.api("POST", "/webhooks", json={"url": receiver.url, "description": "ops"}).json()
    keys = [d.owner.key(scopes=["models:predict"]) for _ in range(16)]
    ids = [key_id(d.url, h) for h in keys]

    def first_alert() -> MonitorAlert | None:
        """The model's first alert that names keys."""
        with session_scope(d.url) as s:
            q = select(MonitorAlert).where(MonitorAlert.model_id == uuid.UUID(model))
            return next((a for a in s.scalars(q.order_by(MonitorAlert.created_at)) if a.keys), None)

    # The replay until the first alert naming keys, then those keys, probed on both replicas. Each replica
    # keeps its own bank of recent queries: over two, a key's repeats are found later than over one.
    stream, send = attack(6000), lambda j, k, x: d.infer(j, model, keys[k], x)
    suspended = replay(send, 16, stream, until=lambda: first_alert() is not None)
    alert = first_alert()
    assert alert is not None, "no alert naming keys after 6000 fm_edge queries over 16 keys"
    named = [ids.index(k["key_id"]) for k in alert.keys]
    fired = alert.created_at.timestamp()
    when = refused_everywhere(d, model, [keys[k] for k in named], fired + 5)
    assert len(when) == 2 * len(named), f"not refused everywhere 5 s after the alert: {when}"
    assert max(when.values()) - fired < 1.0, {kr: t - fired for kr, t in when.items()}

    # The rest of the replay: every key is suspended, on both replicas.
    suspended = replay(send, 16, stream, stopped=suspended)
    assert {p["status"] for p in suspended.values()} == {403}
    everywhere = refused_everywhere(d, model, keys, time.time() + 3)
    assert everywhere.keys() == {(k, r) for k in range(16) for r in (0, 1)}
    alerts = d.api("GET", f"/models/{model}/alerts", params={"limit": 200}).json()["items"]
    for k, problem in suspended.items():
        alert_keys = next(a["keys"] for a in alerts if a["id"] == problem["alert_id"])
        assert ids[k] in {e["key_id"] for e in alert_keys} and model in problem["detail"]
    held = d.api("GET", f"/models/{model}/enforcement/keys", params={"limit": 200}).json()["items"]
    assert {h["key_id"] for h in held} == set(ids) and {h["state"] for h in held} == {"suspended"}
    actions = d.api("GET", f"/models/{model}/enforcement/actions", params={"limit": 200}).json()["items"]
    assert {a["key_id"] for a in actions if a["action"] == "suspend" and a["actor"] == "monitor"} == set(ids)

    # The owner reinstates one key on replica 0: replica 1 answers it (within a second on an idle
    # machine; the deadline is generous so that a loaded machine cannot fail the test).
    r = d.api("POST", f"/models/{model}/enforcement/keys/{ids[0]}", json={"decision": "reinstate"})
    assert r.status_code == 200 and r.json()["action"] == "reinstate" and r.json()["actor"] == "owner", r.text
    reinstated, probe = time.monotonic(), torch.randn(1, 1, 40)
    while (
        code := d.infer(1, model, keys[0], probe).status_code
    ) == 403 and time.monotonic() - reinstated < 30:
        time.sleep(0.02)
    assert code == 200
    assert d.infer(0, model, keys[1], probe).status_code == 403  # the others stay suspended
    assert_problem(
        d.api("POST", f"/models/{model}/enforcement/keys/{ids[0]}", json={"decision": "keep"}), 409
    )
    events = d.api("GET", f"/jobs/{model}/events", params={"after": 0}).json()
    assert {"alert", "enforcement"} <= {e["kind"] for e in events}

    # The owner's receiver, down until deliveries failed, gets every event signed, and the log says so.
    log = f"/webhooks/{hook['id']}/deliveries"
    deadline = time.monotonic() + 20
    while not any(x["attempts"] >= 2 for x in d.api("GET", log).json()["items"]):
        assert time.monotonic() < deadline, "no delivery was retried"
        time.sleep(0.1)
    receiver.start()
    try:
        while (items := d.api("GET", log, params={"limit": 200}).json()["items"]) and any(
            x["status"] != "delivered" for x in items
        ):
            assert time.monotonic() < deadline + 20, [x["status"] for x in items]
            time.sleep(0.1)
    finally:
        receiver.stop()
    retried = [x for x in items if x["attempts"] >= 2]
    assert retried and all(x["log"][0]["error"] and x["log"][-1]["status_code"] == 204 for x in retried)
    got = {}
    for headers, body in receiver.received:
        t, v1 = (part.split("=", 1)[1] for part in headers["x-cmim-signature"].split(","))
        expected = hmac.new(hook["secret"].encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(v1, expected) and abs(time.time() - int(t)) < 300
        got[headers["x-cmim-delivery"]] = json.loads(body)
    assert set(got) == {x["id"] for x in items}
    alerts = d.api("GET", f"/models/{model}/alerts", params={"limit": 200}).json()["items"]
    alerted = sorted(p["data"]["alert_id"] for p in got.values() if p["type"] == "alert")
    assert alerted == sorted(a["id"] for a in alerts)  # every alert, once
    told = [a for p in got.values() if p["type"] == "enforcement" for a in p["data"]["actions"]]
    assert {a["key_id"] for a in told if a["action"] == "suspend"} == set(ids)
    assert [(a["key_id"], a["by"]) for a in told if a["action"] == "reinstate"] == [(ids[0], "owner")]


def test_an_honest_client_resending_an_input_is_never_suspended(deployed: Deployed) -> None:
    d = deployed
    model = d.model()
    retry, sensor, fresh = (d.owner.key(scopes=["models:predict"]) for _ in range(3))
    x, reading = DATA.x_test[:1], DATA.x_test[1:2]
    jitter = torch.Generator().manual_seed(0)
    for i in range(120):  # alternating replicas: each replica's bank sees each stream
        assert d.infer(i, model, retry, x).status_code == 200  # a client retrying one input
        noisy = reading + 0.005 * torch.randn(x.shape, generator=jitter)  # a sensor jittering on one reading
        assert d.infer(i, model, sensor, noisy).status_code == 200
    for i in range(0, 100, 4):
        assert d.infer(i // 4, model, fresh, DATA.x_test[100 + i : 104 + i]).status_code == 200
    # Every replica's monitor has counted the streams: each counts a repeated input once per replica.
    stats = redis.Redis.from_url(d.owner.settings.broker_url)
    base = f"{d.owner.settings.redis_prefix}:monitor:{model}:key"
    counted = {k: key_id(d.url, h) for k, h in (("retry", retry), ("sensor", sensor), ("fresh", fresh))}
    deadline = time.monotonic() + 10
    while (seen := {k: int(stats.hget(f"{base}:{i}", "n") or 0) for k, i in counted.items()}) != {
        "retry": 2,
        "sensor": 2,
        "fresh": 100,
    }:
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    assert d.api("GET", f"/models/{model}/alerts").json()["items"] == []
    assert d.api("GET", f"/models/{model}/enforcement/keys").json()["items"] == []
    for replica in (0, 1):
        meta = d.clients[replica].get(f"/v2/models/{model}", headers=retry).json()
        assert meta["parameters"]["standing"] == {"state": "good"}


# ---------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def embedded(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("enforcement-embedded")
    t = Trained(service_settings(sqlite_url, tmp), tmp)
    t.job_id = t.submit(job_body(**FAST))
    return t


def embedded_replay(t: Trained, model: str, keys: list[dict[str, str]]) -> dict[int, dict[str, Any]]:
    """The replay in process; the monitor flushes after every request (what the app's thread does)."""

    def send(_: int, k: int, x: torch.Tensor) -> Any:
        r = t.client.post(f"/v2/models/{model}/infer", json=v2_body(x), headers=keys[k])
        t.client.app.state.monitor.flush()
        return r

    return replay(send, len(keys), attack(2000))


def test_the_dashboard_lists_suspended_keys_and_reinstates_one(embedded: Trained) -> None:
    t = embedded
    model = str(copy_job(t.settings.database_url, uuid.UUID(t.job_id)))
    keys = [t.key(scopes=["models:predict"]) for _ in range(4)]
    suspended = embedded_replay(t, model, keys)
    assert suspended and {p["status"] for p in suspended.values()} == {403}, suspended
    k = min(suspended)
    victim = key_id(t.settings.database_url, keys[k])
    csrf = sign_in(t.client, t.secret)
    try:
        page = t.client.get(f"/models/{model}/enforcement")
        assert page.status_code == 200 and 'id="held"' in page.text
        assert f'data-key="{victim}"' in page.text and "suspended" in page.text
        assert suspended[k]["alert_id"] in page.text  # the alert that suspended it
        assert f'href="/models/{model}/enforcement"' in t.client.get("/models", params={"id": model}).text
        form = {"csrf": csrf, "decision": "reinstate"}
        done = t.client.post(f"/models/{model}/enforcement/keys/{victim}", data=form, headers=ORIGIN)
        assert done.status_code == 200 and done.url.path == f"/models/{model}/enforcement"
        assert f'data-key="{victim}"' not in done.text and "reinstate" in done.text  # the action log
        again = t.client.post(f"/models/{model}/enforcement/keys/{victim}", data=form, headers=ORIGIN)
        assert again.status_code == 409 and "not held" in again.text
    finally:
        t.client.cookies.clear()
    ok = t.client.post(f"/v2/models/{model}/infer", json=v2_body(torch.randn(1, 1, 40)), headers=keys[k])
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("action", ["throttle", "probation"])
def test_throttle_and_probation_follow_the_owners_policy(embedded: Trained, action: str) -> None:
    t = embedded
    model = str(copy_job(t.settings.database_url, uuid.UUID(t.job_id)))
    policy = {
        "on_key_alert": action,
        "on_model_alert": "notify",
        "throttle_fraction": 0.5,
        "probation_queries": 7,
    }
    r = t.client.patch(f"/api/v1/models/{model}/enforcement", json=policy, headers=t.headers)
    assert r.status_code == 200 and r.json()["source"] == "owner", r.text
    keys = [t.key(scopes=["models:predict"]) for _ in range(4)]
    refused = embedded_replay(t, model, keys)
    # throttled, the replay's 10 requests a key stay under 500 a minute; on probation, 50 rows are over 7
    assert {p["status"] for p in refused.values()} == (set() if action == "throttle" else {429}), refused
    held = t.client.get(f"/api/v1/models/{model}/enforcement/keys", headers=t.headers).json()["items"]
    assert held and {h["state"] for h in held} == {"throttled" if action == "throttle" else "probation"}
    paged, cursor = [], None  # one key a page, through every cursor: the same keys in the same order
    while cursor or not paged:
        params = {"limit": 1} | ({"cursor": cursor} if cursor else {})
        page = t.client.get(f"/api/v1/models/{model}/enforcement/keys", params=params, headers=t.headers)
        paged, cursor = paged + page.json()["items"], page.json()["next_cursor"]
    assert paged == held and len(held) > 1
    infer = f"/v2/models/{model}/infer"
    for h in held:
        headers = keys[[key_id(t.settings.database_url, k) for k in keys].index(h["key_id"])]
        probe = t.client.post(infer, json=v2_body(torch.randn(1, 1, 40)), headers=headers)
        assert probe.status_code == 200, probe.text
        meta = t.client.get(f"/v2/models/{model}", headers=headers).json()["parameters"]
        assert meta["standing"]["state"] == h["state"] and meta["standing"]["alert_id"] == h["alert_id"]
        if action == "throttle":  # half the test settings' 1000 requests a minute
            assert h["rate_fraction"] == 0.5 and probe.headers["x-ratelimit-limit"] == "500"
            continue
        budget = meta["query_budget"]  # 7 rows past what the key had at the alert
        assert budget["limit"] == h["budget_limit"] and "probation" in budget["reason"]
        assert probe.headers["x-query-budget-source"] == "probation"
        over = torch.randn(h["budget_limit"] - budget["used"] + 1, 1, 40)
        body = assert_problem(t.client.post(infer, json=v2_body(over), headers=headers), 429)
        assert body["budget"]["scope"] == "key" and body["budget"]["limit"] == h["budget_limit"]


def test_the_policy_is_the_owners_to_read_and_change(embedded: Trained) -> None:
    t = embedded
    db = t.settings.database_url
    with session_scope(db) as s:
        spec = s.get(Job, uuid.UUID(t.job_id)).spec
        _, other = create_api_key(s)
    chosen = {"serving": {"enforcement": {"on_key_alert": "notify", "owner_query_budget": 30}}}
    model = str(copy_job(db, uuid.UUID(t.job_id), spec=spec | chosen))
    url = f"/api/v1/models/{model}/enforcement"
    got = t.client.get(url, headers=t.headers).json()
    assert got["source"] == "job" and got["updated_at"] is None
    assert got["policy"]["on_key_alert"] == "notify" and got["policy"]["on_model_alert"] == "suspend"
    # the owner cap the policy sets holds over all the owner's keys
    a, b = t.key(scopes=["models:predict"]), t.key(scopes=["models:predict"])
    x = torch.randn(20, 1, 40)
    assert t.client.post(f"/v2/models/{model}/infer", json=v2_body(x), headers=a).status_code == 200
    capped = assert_problem(t.client.post(f"/v2/models/{model}/infer", json=v2_body(x), headers=b), 429)
    assert capped["budget"]["scope"] == "owner" and capped["budget"]["limit"] == 30
    put = t.client.put(url, json={"on_model_alert": "throttle"}, headers=t.headers).json()
    assert put["source"] == "owner" and put["policy"] == {
        "on_key_alert": "suspend",  # PUT: what is left out takes its default
        "on_model_alert": "throttle",
        "throttle_fraction": 0.1,
        "probation_queries": 100,
        "owner_query_budget": None,
    }
    assert (
        t.client.post(f"/v2/models/{model}/infer", json=v2_body(x), headers=b).status_code == 200
    )  # no cap now
    patched = t.client.patch(url, json={"probation_queries": 5}, headers=t.headers).json()["policy"]
    assert patched["probation_queries"] == 5 and patched["on_model_alert"] == "throttle"
    events = t.client.get(f"/api/v1/jobs/{model}/events", headers=t.headers, params={"after": 0}).json()
    assert [e["data"]["enforcement"]["probation_queries"] for e in events if e["kind"] == "policy"] == [
        100,
        5,
    ]
    for bad in ({"on_key_alert": "ban"}, {"throttle_fraction": 2}, {"probation_queries": -1}, {"nope": 1}):
        body = assert_problem(t.client.patch(url, json=bad, headers=t.headers), 422)
        assert body["errors"][0]["loc"][0] == "body", body
    assert_problem(t.client.put(url, json={"on_key_alert": "ban"}, headers=t.headers), 422)
    for method in ("GET", "PUT"):
        assert_problem(
            t.client.request(method, url, json={}, headers={"Authorization": f"Bearer {other}"}), 404
        )
    reader = t.key(scopes=["jobs:read"])
    assert t.client.get(url, headers=reader).status_code == 200
    assert_problem(t.client.put(url, json={}, headers=reader), 403)
    review = f"{url}/keys/{key_id(db, a)}"
    not_held = assert_problem(t.client.post(review, json={"decision": "reinstate"}, headers=t.headers), 409)
    assert "not held" in not_held["detail"]
    assert_problem(t.client.post(review, json={"decision": "forgive"}, headers=t.headers), 422)
    assert_problem(t.client.post(review, json={"decision": "keep"}, headers=reader), 403)
    for path in ("/keys", "/actions"):
        assert_problem(t.client.get(url + path, params={"cursor": "nope"}, headers=t.headers), 422)
        assert t.client.get(url + path, headers=t.headers).json() == {"items": [], "next_cursor": None}
