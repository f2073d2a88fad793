"""Job presets (API, spec, overrides) and job progress read from events, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

from service_helpers import assert_problem, job_body

from app.core.db import session_scope
from app.core.models import Job, JobStatus
from app.core.queue import append_event, status_event
from ml.benchmark import BENCHMARKS
from ml.presets import PRESETS


def test_presets_are_listed_with_description_and_time(client) -> None:
    r = client.get("/api/v1/presets")
    assert r.status_code == 200, r.text
    by_name = {p["name"]: p for p in r.json()}
    assert set(by_name) == {"quick", "standard"}
    assert by_name["quick"]["indicative"] and not by_name["standard"]["indicative"]
    assert all(p["description"] and p["expected_time"] for p in by_name.values())
    bench = BENCHMARKS.get("mnist1d")
    standard = by_name["standard"]["job"]
    assert standard["teacher"]["epochs"] == bench.teacher_epochs == 60
    assert standard["teacher"]["dataset_params"] == {"num_train": 4000, "num_test": 10000}
    assert standard["audit"]["epochs"] == bench.epochs and standard["audit"]["seeds"] == bench.seeds
    assert standard["audit"]["attacks"] == bench.attacks


def test_preset_job_records_preset_and_explicit_fields_override(client, caller) -> None:
    body = {"preset": "quick", "teacher": {"epochs": 2, "dataset_params": {"num_train": 300}}}
    r = client.post("/api/v1/jobs", json=body, headers=caller.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    quick = PRESETS.get("quick")
    assert job["preset"] == "quick" and job["indicative"] is True
    assert job["spec"]["preset"] == "quick" and job["spec"]["indicative"] is True
    teacher = job["spec"]["teacher"]
    assert teacher["epochs"] == 2  # overridden
    assert (
        teacher["dataset_params"] | {"num_train": 300, "num_test": 1000} == teacher["dataset_params"]
    )  # merged
    assert teacher["objective_params"] == quick.teacher["objective_params"]  # from the preset
    assert job["spec"]["audit"]["attacks"] == quick.audit["attacks"]
    assert job["progress"] == job["progress"] | {"stage": "queued", "fraction": 0.0}
    plain = client.post("/api/v1/jobs", json=job_body(), headers=caller.headers).json()
    assert plain["preset"] is None and plain["indicative"] is False


def test_another_objective_does_not_inherit_the_presets_objective_params(client, caller) -> None:
    """CMIM's `lam` belongs to CMIM: a standard job with a CE teacher is a valid job, not a 422."""
    body = {"preset": "standard", "teacher": {"objective": "ce"}}
    r = client.post("/api/v1/jobs", json=body, headers=caller.headers)
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["teacher"]["objective"] == "ce"
    assert not r.json()["spec"]["teacher"]["objective_params"]
    own = {"preset": "quick", "teacher": {"objective": "cmim", "objective_params": {"lam": 1.0}}}
    r = client.post("/api/v1/jobs", json=own, headers=caller.headers)
    assert r.status_code == 202 and r.json()["spec"]["teacher"]["objective_params"] == {"lam": 1.0}


def test_unknown_preset_is_a_422_naming_the_choices(client, caller) -> None:
    problem = assert_problem(
        client.post("/api/v1/jobs", json={"preset": "fast"}, headers=caller.headers), 422
    )
    assert "quick" in str(problem) and "standard" in str(problem)
    assert_problem(client.post("/api/v1/jobs", json={}, headers=caller.headers), 422)  # no teacher, no preset


def test_progress_follows_the_jobs_events(client, caller, settings) -> None:
    job_id = uuid.UUID(client.post("/api/v1/jobs", json=job_body(), headers=caller.headers).json()["id"])

    def progress() -> dict:
        one = client.get(f"/api/v1/jobs/{job_id}", headers=caller.headers).json()["progress"]
        listed = client.get("/api/v1/jobs", headers=caller.headers).json()["items"][0]["progress"]
        assert listed["fraction"] == one["fraction"] and listed["stage"] == one["stage"]
        return one

    def event(kind: str, data: dict, status: JobStatus | None = None) -> None:
        with session_scope(settings.database_url) as s:
            job = s.get(Job, job_id)
            if status is not None:
                job.status = status.value
                job.started_at = job.started_at or job.created_at
                status_event(s, job_id, status, **data)
            else:
                append_event(s, job_id, kind, data)

    assert progress()["stage"] == "queued"
    event("status", {}, JobStatus.training)
    assert progress()["fraction"] == 0.0
    event("epoch", {"stage": "teacher", "epoch": 1, "epochs": 3, "test_acc": 50.0})
    first = progress()
    assert first["stage"] == "teacher" and first["epoch"] == 1 and first["test_acc"] == 50.0
    assert 0 < first["fraction"] < 0.5
    assert first["eta_seconds"] is None  # the teacher's pace does not tell the audit's: no estimate yet
    event("epoch", {"stage": "control", "epoch": 3, "epochs": 3, "test_acc": 60.0})
    trained = progress()
    assert trained["stage"] == "control" and trained["fraction"] > first["fraction"]
    event("warning", {"stage": "teacher", "message": "a warning is not progress"})
    assert progress()["fraction"] == trained["fraction"]
    event("status", {}, JobStatus.auditing)
    event("progress", {"stage": "audit", "done": 1, "total": 2, "message": "seed 0"})
    audit = progress()
    assert audit["stage"] == "audit" and audit["done"] == 1 and trained["fraction"] < audit["fraction"] < 1
    assert audit["eta_seconds"] is not None  # half the audit done: its own pace says what is left
    headline = {"verdict": "distillable", "teacher_accuracy": 91.5, "safe_budget": 2000}
    event("status", headline, JobStatus.succeeded)
    done = client.get(f"/api/v1/jobs/{job_id}", headers=caller.headers).json()
    assert done["progress"]["fraction"] == 1.0 and done["result"] == headline
    listed = client.get("/api/v1/jobs?verdict=distillable", headers=caller.headers).json()["items"]
    assert [j["id"] for j in listed] == [str(job_id)]
    assert client.get("/api/v1/jobs?verdict=undistillable", headers=caller.headers).json()["items"] == []
    assert_problem(client.get("/api/v1/jobs?verdict=maybe", headers=caller.headers), 422)
