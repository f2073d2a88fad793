"""Verify on the selected challenge: when the report says it works (and the fingerprint does not, or detects
no more), publishing stores its kept points with the teacher's labels beside the fingerprint's, and verify,
the challenge route and the bundle use it with its own null (the held-out independent models); otherwise
verify stays on the fingerprint."""

from __future__ import annotations

import io
import zipfile
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from service_helpers import Trained, service_settings
from test_evidence_api import DATA, EVIDENCE_JOB, fit_mlp, labels_on

from app.core.storage import ArtifactStore
from ml.data import load_dataset
from ml.evidence import CHALLENGE_POINTS
from ml.evidence import verify as ev_verify
from ml.evidence.check_bundle import check
from ml.evidence.selected import pool_size
from ml.evidence.verify import chosen_section, selected_names, unpack_challenge
from worker.publish import store_selected

KEPT = 64


def report(selected: dict[str, Any], fingerprint: dict[str, Any]) -> dict[str, Any]:
    mechs = {"selected": {"teacher": {"mlp": selected}}, "fingerprint": {"teacher": {"mlp": fingerprint}}}
    return {"evidence": {"mechanisms": mechs}}


def test_the_rule_that_picks_the_selected_challenge() -> None:
    works, fails = {"works": True, "tpr_unlimited": 0.8}, {"works": False}
    fp_works, fp_fails = {"fpr": 0.0, "tpr_unlimited": 0.9}, {"fpr": 0.2, "tpr_unlimited": 1.0}
    assert chosen_section(report(works, fp_fails)) is works  # the fingerprint does not work
    assert chosen_section(report(works, {"fpr": 0.0, "tpr_unlimited": 0.0})) is works  # detects none
    assert chosen_section(report(works | {"tpr_unlimited": 0.9}, fp_works)) is not None  # as good
    assert chosen_section(report(works, fp_works)) is None  # the fingerprint detects more
    assert chosen_section(report(fails, fp_fails)) is None  # neither: verify says evidence cannot work
    assert chosen_section({"evidence": {"mechanisms": {}}}) is None


@pytest.fixture(scope="module")
def owner(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("selected")
    owner = Trained(service_settings(sqlite_url, tmp), tmp)
    owner.job_id = owner.submit(EVIDENCE_JOB)
    return owner


def test_verify_uses_the_selected_challenge_when_the_report_says_it_works(
    owner: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore.from_settings(owner.settings)
    base, h = f"/api/v1/models/{owner.job_id}", owner.headers
    pool_name, selected_name = selected_names(owner.job_id)
    pool = unpack_challenge(store.read_named(pool_name))  # stored at audit start, drawn from the secret
    assert len(pool.labels) == pool_size(CHALLENGE_POINTS)
    real = owner.client.get(f"{base}/report", headers=h).json()
    assert (store.read_named(selected_name) is not None) == (chosen_section(real) is not None)
    if chosen_section(real) is None:
        assert owner.client.get(f"{base}/challenge", headers=h).json()["mechanism"] == "fingerprint"

    # a report whose selected section works (kept points, held-out independent models' agreements on them)
    data = load_dataset("mnist1d", **DATA)
    kept = list(range(0, len(pool.labels), len(pool.labels) // KEPT))[:KEPT]
    x, labels = pool.x[kept], pool.labels[kept]
    independent = [fit_mlp(data.x_train, data.y_train, seed=s) for s in range(11, 17)]
    agree = [float((torch.tensor(labels_on(m, x.tolist())) == labels).float().mean()) for m in independent]
    section = {"works": True, "challenge": kept, "negatives": {"plain": agree[:5]}, "selected_points": KEPT,
               "fpr": 0.0, "tpr_unlimited": 1.0}  # fmt: skip
    monkeypatch.setattr(ev_verify, "chosen_section", lambda report, box="teacher": section)
    ctx = SimpleNamespace(claim=SimpleNamespace(job_id=owner.job_id), retrying=lambda fn, what: fn())
    store_selected(ctx, store, real)  # what publishing does
    stored = unpack_challenge(store.read_named(selected_name))
    assert torch.equal(stored.x, x) and torch.equal(stored.labels, labels)

    ch = owner.client.get(f"{base}/challenge", headers=h).json()
    assert ch["mechanism"] == "selected" and ch["points"] == KEPT and "labels" not in ch
    assert torch.allclose(torch.tensor(ch["inputs"]), x)
    out = {}
    for name, answers in (
        ("teacher", labels.tolist()),
        ("independent", labels_on(independent[5], ch["inputs"])),
    ):
        r = owner.client.post(f"{base}/verify", json={"answers": answers}, headers=h)
        assert r.status_code == 200, r.text
        out[name] = r.json()
    assert out["teacher"]["verdict"] == "copy" and out["teacher"]["mechanism"] == "selected", out
    assert "held-out" in out["teacher"]["null_scope"] and set(out["teacher"]["null"]) == {"plain"}
    assert out["independent"]["verdict"] == "not_shown", out

    r = owner.client.get(f"{base}/verifications/{out['teacher']['verification']}/bundle", headers=h)
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    assert check(files) == []  # the bundle's script reproduces the verdict on the selected challenge
    assert b'"mechanism": "selected"' in files["manifest.json"]
    # revealed: the selected challenge is retired, the fresh one is the fingerprint's
    assert owner.client.get(f"{base}/challenge", headers=h).json()["mechanism"] == "fingerprint"
