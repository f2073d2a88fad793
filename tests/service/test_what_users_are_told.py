"""What a user is told matches what happens, on SQLite and PostgreSQL: where a model's per-key budget comes
from, how a preset serves, the time a job has left, the output mode and served scores on the dashboard, and
a new key's expiry."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from service_helpers import Trained, assert_problem, copy_job, job_body, service_settings
from test_dashboard_session import ORIGIN, sign_in

from app.core.db import session_scope
from app.core.models import Job, JobEvent, JobStatus, utcnow
from app.core.queue import append_event, status_event
from app.main import create_app
from ml.audit import DEFAULT_BUDGET_PASSES, AuditConfig
from ml.oracle import OutputMode

# A job of seconds whose audit runs the default budget curve (query_budgets null) and whose model is
# served with its three highest probabilities.
TOP3_NULL_BUDGETS = job_body(
    **{
        "teacher.dataset_params": {"num_train": 200, "num_test": 200},
        "teacher.epochs": 2,
        "audit.attacks": ["hard_label"],
        "audit.epochs": 1,
        "audit.control": False,
        "audit.query_budgets": None,
        "audit.output_mode": {"kind": "topk", "k": 3},
    }
)
ROWS = [[[0.1] * 40], [[-0.3] * 40]]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def owner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("told")
    owner = Trained(service_settings(request.getfixturevalue(f"{request.param}_url"), tmp), tmp)
    owner.job_id = owner.submit(TOP3_NULL_BUDGETS)
    return owner


def _respec(owner: Trained, **audit: object) -> str:
    """Another model id for the owner's job's checkpoint, with these audit fields in its spec."""
    with session_scope(owner.settings.database_url) as s:
        spec = s.get(Job, uuid.UUID(owner.job_id)).spec
    spec = spec | {"audit": spec["audit"] | audit}
    return str(copy_job(owner.settings.database_url, uuid.UUID(owner.job_id), spec=spec))


def test_null_query_budgets_audit_the_default_curve_and_the_served_budget_says_so(owner: Trained) -> None:
    c, h, job = owner.client, owner.headers, owner.job_id
    report = c.get(f"/api/v1/jobs/{job}/report", headers=h).json()
    labelled, tested = report["threat_model"]["labelled_samples"], report["threat_model"]["query_budgets"]
    assert tested == [labelled * p for p in DEFAULT_BUDGET_PASSES]  # null: the documented default curve
    budget = c.get(f"/v2/models/{job}", headers=h).json()["parameters"]["query_budget"]
    assert budget["model_budget"] == min(report["safe_budget"]["teacher"].values())
    why = budget["model_budget_reason"]
    assert "the job's audit.query_budgets was null" in why, why
    assert f"tested budgets {', '.join(f'{b:,}' for b in tested)}" in why
    assert f"passes over the attacker's {labelled:,} labelled samples" in why
    # The same audit with the budgets named in the job's spec says they were the job's own.
    named = _respec(owner, query_budgets=tested)
    why = c.get(f"/v2/models/{named}", headers=h).json()["parameters"]["query_budget"]["model_budget_reason"]
    assert "the job's audit.query_budgets" in why and "null" not in why


def test_every_preset_serves_labels_only_the_documented_default(client, caller) -> None:
    default = AuditConfig().output_mode
    assert default == OutputMode(kind="label")
    for preset in client.get("/api/v1/presets").json():
        assert OutputMode.model_validate(preset["job"]["audit"]["output_mode"]) == default, preset["name"]
    job = client.post("/api/v1/jobs", json={"preset": "quick"}, headers=caller.headers).json()
    assert OutputMode.model_validate(job["spec"]["audit"]["output_mode"]) == default


# A quick job as measured (in one process on a 2-core CPU, 41.2 s from claim to report): 3.6 s of set-up,
# teacher and control epochs of 0.22 s, the audit from 10.4 s, its 120 units at an uneven pace (setting up,
# then fast, then slower phases). The old estimate said 502 s left at 5.6 s.
QUICK_TOTAL_S = 41.2
QUICK_TIMELINE: list[tuple[float, str, dict]] = [
    *[(3.6 + 0.22 * i, "epoch", {"stage": "teacher", "epoch": i + 1, "epochs": 15}) for i in range(15)],
    *[(7.2 + 0.22 * i, "epoch", {"stage": "control", "epoch": i + 1, "epochs": 15}) for i in range(15)],
    (10.4, "status", {"status": "auditing"}),
    *[
        (t, "progress", {"stage": "audit", "done": done, "total": 120})
        for t, done in [
            (11.1, 1), (13.1, 7), (15.5, 14), (17.6, 19), (19.7, 36), (21.9, 50), (24.2, 64),
            (26.3, 70), (28.3, 74), (30.8, 78), (33.0, 83), (35.1, 95), (38.6, 105),
        ]
    ],
]  # fmt: skip


def test_time_left_waits_for_the_audits_own_pace_then_is_within_3x_of_the_truth(
    client, caller, settings
) -> None:
    """The quick job's timeline replayed through the API: at each event the job is as old as it was then."""
    job_id = uuid.UUID(
        client.post("/api/v1/jobs", json={"preset": "quick"}, headers=caller.headers).json()["id"]
    )
    with session_scope(settings.database_url) as s:
        s.get(Job, job_id).status = JobStatus.training.value
        status_event(s, job_id, JobStatus.training)
    audit_event = None
    told = []
    for at, kind, data in QUICK_TIMELINE:
        with session_scope(settings.database_url) as s:
            job = s.get(Job, job_id)
            seq = append_event(s, job_id, kind, data)
            if kind == "status":
                job.status, audit_event = data["status"], seq
            now = utcnow()
            job.started_at = now - timedelta(seconds=at)
            if audit_event is not None:  # the audit began 10.4 s into the job
                event = s.query(JobEvent).filter_by(job_id=job_id, seq=audit_event).one()
                event.created_at = now - timedelta(seconds=at - 10.4)
        eta = client.get(f"/api/v1/jobs/{job_id}", headers=caller.headers).json()["progress"]["eta_seconds"]
        listed = client.get("/api/v1/jobs", headers=caller.headers).json()["items"][0]["progress"]
        assert listed["eta_seconds"] == (None if eta is None else pytest.approx(eta, abs=0.5))
        told.append((at, data.get("done", 0) / data.get("total", 1), eta))
    for at, share, eta in told:
        if share < 0.05:  # training, or the audit's set-up: nothing measured of the audit's pace yet
            assert eta is None, (at, eta)
        else:
            truth = QUICK_TOTAL_S - at
            assert eta is not None and truth / 3 <= eta <= truth * 3, (at, eta, truth)


@pytest.fixture
def web(owner: Trained) -> Iterator[tuple[TestClient, str]]:
    """The dashboard signed in with the owner's key, and its session's CSRF token."""
    with TestClient(create_app(owner.settings)) as web:
        yield web, sign_in(web, owner.secret)


def predict_page(web: tuple[TestClient, str], model: str) -> str:
    client, token = web
    page = client.post(
        f"/models/{model}/predict", data={"csrf": token, "inputs": json.dumps(ROWS)}, headers=ORIGIN
    )
    assert page.status_code == 200, page.text
    return page.text


def test_the_models_and_compare_pages_say_the_output_mode_in_words(
    owner: Trained, web: tuple[TestClient, str]
) -> None:
    client, job = web[0], owner.job_id
    page = client.get(f"/models?id={job}").text
    assert '<td id="output-mode">top-3 probabilities</td>' in page and '<td id="policy">none</td>' in page
    compare = client.get(f"/compare?a={job}&b={job}").text
    assert compare.count("<td>top-3 probabilities</td>") == 2 and '"kind"' not in compare
    labels = _respec(owner, output_mode={"kind": "label"})
    assert '<td id="output-mode">labels only</td>' in client.get(f"/models?id={labels}").text


def test_the_predict_form_shows_the_probabilities_the_model_serves(
    owner: Trained, web: tuple[TestClient, str]
) -> None:
    job = owner.job_id
    page = predict_page(web, job)
    # Each row's served probabilities as the API answers them: three classes, highest first.
    names = owner.client.get(f"/v2/models/{job}", headers=owner.headers).json()["parameters"]["class_names"]
    api = owner.client.post(f"/api/v1/models/{job}/predict", json={"inputs": ROWS}, headers=owner.headers)
    expected = [
        sorted(((names[c], s) for c, s in enumerate(p["scores"]) if s > 0), key=lambda x: -x[1])
        for p in api.json()["predictions"]
    ]
    assert [len(row) for row in expected] == [3, 3]
    cells = re.findall(r'<td class="scores">(.*?)</td>', page)
    shown = [re.findall(r'<span class="score">([^<:]+): ([0-9.]+)</span>', cell) for cell in cells]
    assert shown == [[(name, f"{s:.3f}") for name, s in row] for row in expected]
    # A model served labels only answers no scores, and the page shows none.
    page = predict_page(web, _respec(owner, output_mode={"kind": "label"}))
    assert 'class="label"' in page and 'class="scores"' not in page


def test_a_new_key_cannot_expire_in_the_past(client, caller) -> None:
    before = {k["id"] for k in client.get("/api/v1/keys", headers=caller.headers).json()["items"]}
    for past in (utcnow() - timedelta(days=365), utcnow()):
        r = client.post(
            "/api/v1/keys", json={"name": "late", "expires_at": past.isoformat()}, headers=caller.headers
        )
        problem = assert_problem(r, 422)
        assert problem["errors"][0]["loc"] == ["body", "expires_at"]
        assert "is not in the future" in problem["detail"]
    soon = (utcnow() + timedelta(minutes=5)).isoformat()
    assert client.post("/api/v1/keys", json={"expires_at": soon}, headers=caller.headers).status_code == 201
    # The dashboard's form says why, and makes no key either.
    token = sign_in(client, caller.key)
    page = client.post(
        "/keys", data={"csrf": token, "name": "late", "expires_at": "2020-01-01T00:00Z"}, headers=ORIGIN
    )
    assert (
        page.status_code == 422 and "is not in the future" in page.text and 'id="new-secret"' not in page.text
    )
    after = [
        k for k in client.get("/api/v1/keys", headers=caller.headers).json()["items"] if k["id"] not in before
    ]
    assert [k["name"] for k in after] == ["key"]  # only the one expiring in five minutes
