"""A seeded job's published report is the same, field by field, as the report the same job published
before the audit result became a typed model (the fixture `seeded_report.json`, written by this module
run as a script on the code of that time).

What is measured in seconds (the audit's wall and task times, and the minutes estimated from them)
and the job's own id differ between runs; every other field must be equal. The figures come from
torch's portable CPU kernels (as `tests/ml/audit_golden.json`): on a vectorised CPU the test runs itself
again in a process pinned to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

FIXTURE = Path(__file__).parent / "seeded_report.json"
SEEDED_JOB: dict[str, Any] = {
    "teacher": {
        "dataset": "mnist1d",
        "dataset_params": {"num_train": 400, "num_test": 300},
        "arch": "cnn1d_small",
        "objective": "cmim",
        "epochs": 2,
        "seed": 3,
    },
    "audit": {
        "students": ["mlp"],
        "attacks": ["kd", "hard_label", "fm"],
        "seeds": 2,
        "epochs": 2,
        "ls_eps": [0.0, 0.1],
        "ls_mixup": False,
        "control": True,
        "policy": {"snap": True},
        "query_budgets": [150],
    },
}
MEASURED = ("wall_s", "timing", "job_id")  # seconds, and the job's own id


def seeded_report(database_url: str, tmp: Path) -> dict[str, Any]:
    """Run SEEDED_JOB in process (its evidence secret fixed beforehand) and return its published report."""
    from service_helpers import service_settings

    from app.core.db import session_scope
    from app.core.keys import create_api_key
    from app.core.models import REPORT_NAME, Artifact
    from app.core.storage import ArtifactStore
    from app.services.jobs import create_job
    from app.services.schemas import JobCreate
    from ml.evidence import Secret
    from ml.evidence.verify import store_names
    from worker.pipeline import run_job

    settings = service_settings(database_url, tmp)
    with session_scope(database_url) as s:
        key, _ = create_api_key(s)
        job, _ = create_job(s, settings, key, JobCreate.model_validate(SEEDED_JOB), None)
        job_id = job.id
    store = ArtifactStore.from_settings(settings)
    store.write_named(store_names(str(job_id))[0], json.dumps(Secret.benchmark(7).to_json()).encode())
    assert run_job(job_id, settings) == "succeeded"
    with session_scope(database_url) as s:
        rows = s.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == REPORT_NAME))
        storage_key = rows.one().storage_key
    return json.loads(store.read_bytes(storage_key))


ADDED = (
    ".config.null_archs",
    ".config.null_models",
    ".other_architectures",
    ".evidence.mechanisms.selected",
    ".findings.evidence",
)


def measured_since(before: dict[str, Any]) -> dict[str, Any]:
    """The fixture with what the enforcement policy adds as the benchmark has measured it since (the
    fixture was written before a run was recorded in `ml/audit/enforced_measured.json`)."""
    from ml.audit.statement import enforcement_statement

    old, new = before["statement"]["enforcement"], enforcement_statement()
    before["statement"] |= {"enforcement": new, "text": before["statement"]["text"].replace(old, new)}
    return before


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what is measured in seconds: the estimated minutes go, the rest stays."""
    out = {k: v for k, v in report.items() if k not in MEASURED}
    f = dict(out["findings"])
    if f.get("suggested_audit"):
        f["suggested_audit"] = {k: v for k, v in f["suggested_audit"].items() if k != "estimated_minutes"}
    f["to_conclude"] = [t for t in f["to_conclude"] if not t.startswith("Estimated time")]
    out["findings"] = f
    return out


# Floats equal to float32's precision: the CMI figures are float32 sums, whose last bits the BLAS kernels
# of another CPU (an AMD EPYC against the fixture's) round otherwise, portable ATen kernels or not (1e-7).
FLOAT_REL = 1e-6


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Every path where a and b differ (floats within FLOAT_REL), for a readable failure."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [
            d for k in keys for d in differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float) and a == pytest.approx(b, rel=FLOAT_REL, abs=1e-12):
        return []
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


def test_a_seeded_jobs_report_equals_the_one_published_before(request, sqlite_url, tmp_path) -> None:
    from portable_kernels import ran_on_portable_kernels

    if ran_on_portable_kernels(request):
        return
    before = measured_since(json.loads(FIXTURE.read_text()))
    report = seeded_report(sqlite_url, tmp_path)
    assert set(report) == set(before)
    assert set(report["timing"]) == set(before["timing"])
    changed = differences(comparable(report), comparable(before))
    # what the evidence work added since (the null over other architectures, the selected challenge, and the
    # findings' word on evidence) is new, never a change: every field the report had is the same
    assert [d for d in changed if not (d.endswith("!= '<absent>'") and d.split(":")[0].endswith(ADDED))] == []


if __name__ == "__main__":  # writes the fixture: ATEN_CPU_CAPABILITY=default python <this file>
    import tempfile

    from app.core.migrate import upgrade

    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", "run with ATEN_CPU_CAPABILITY=default"
    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp / 'cmim.db'}"
    upgrade(url)
    FIXTURE.write_text(json.dumps(seeded_report(url, tmp), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
