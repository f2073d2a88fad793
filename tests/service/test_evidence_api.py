"""Evidence of theft through the API: a knockoff made here through the predict route is called a copy
(as black-box answers and as an uploaded checkpoint), an independent model is not, bad requests are
problems, and the job's evidence secret appears in no response of the flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from service_helpers import Trained, assert_problem, job_body, service_settings

from app.core.storage import ArtifactStore
from ml.checkpoint import ModelMeta, save_checkpoint
from ml.data import load_dataset
from ml.evidence.verify import store_names
from ml.models import build_model

DATA = {"num_train": 500, "num_test": 500}
# Three seeds x three eps = 9 independent LS students per family (plain, mixup): the verdict's null.
EVIDENCE_JOB = job_body(
    **{
        "teacher.dataset_params": DATA,
        "teacher.epochs": 8,
        "audit.attacks": ["hard_label"],
        "audit.seeds": 3,
        "audit.ls_eps": [0.0, 0.1, 0.2],
        "audit.ls_mixup": True,
        "audit.output_mode": {"kind": "label"},
    }
)
POOL = 3000  # mixed queries the thief sends through the predict route


@pytest.fixture(scope="module")
def owner(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("evidence")
    owner = Trained(service_settings(sqlite_url, tmp, predict_max_batch=500), tmp)
    owner.job_id = owner.submit(EVIDENCE_JOB)
    return owner


def fit_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 500) -> torch.nn.Module:
    """An MLP trained with CE on (x, y), in minibatches of 128."""
    data = load_dataset("mnist1d", **DATA)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    m = build_model("mlp", data.input_shape, data.num_classes, mean=data.mean, std=data.std)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(steps):
        i = torch.randint(len(x), (128,), generator=g)
        loss = F.cross_entropy(m(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def knockoff(owner: Trained, responses: list[Any]) -> torch.nn.Module:
    """A label-only function-matching thief: mixes of training inputs, labelled by the served model."""
    data = load_dataset("mnist1d", **DATA)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(len(data.x_train), (2, POOL), generator=g)
    lam = torch.rand(POOL, 1, 1, generator=g)
    x = lam * data.x_train[a] + (1 - lam) * data.x_train[b]
    labels = []
    for i in range(0, POOL, 500):
        r = owner.client.post(
            f"/api/v1/models/{owner.job_id}/predict",
            json={"inputs": x[i : i + 500].tolist()},
            headers=owner.headers,
        )
        assert r.status_code == 200, r.text
        responses.append(r)
        labels += [p["label"] for p in r.json()["predictions"]]
    return fit_mlp(x, torch.tensor(labels), seed=1)


def labels_on(model: torch.nn.Module, inputs: list[Any]) -> list[int]:
    with torch.no_grad():
        return model(torch.tensor(inputs, dtype=torch.float32)).argmax(-1).tolist()


def upload(owner: Trained, model: torch.nn.Module, folder: Path, responses: list[Any]) -> str:
    data = load_dataset("mnist1d", **DATA)
    meta = ModelMeta(arch="mlp", input_shape=data.input_shape, num_classes=data.num_classes,
                     class_names=data.class_names, mean=data.mean, std=data.std)  # fmt: skip
    weights, config = save_checkpoint(model, meta, folder)
    files = {
        "file": ("model.safetensors", weights.read_bytes()),
        "config": ("model.json", config.read_bytes()),
    }
    r = owner.client.post("/api/v1/models", files=files, headers=owner.headers)
    assert r.status_code == 201, r.text
    responses.append(r)
    return r.json()["id"]


def test_challenge_answers_and_uploads_are_verified_and_the_secret_is_never_served(owner: Trained) -> None:
    base, h, responses = f"/api/v1/models/{owner.job_id}", owner.headers, []
    ch = owner.client.get(f"{base}/challenge", headers=h)
    assert ch.status_code == 200, ch.text
    responses.append(ch)
    challenge = ch.json()
    assert challenge["points"] == len(challenge["inputs"]) == 512 and challenge["input_shape"] == [1, 40]
    assert "labels" not in challenge

    thief = knockoff(owner, responses)
    data = load_dataset("mnist1d", **DATA)
    honest = fit_mlp(data.x_train, data.y_train, seed=2)
    verdicts = {}
    for name, model in (("knockoff", thief), ("independent", honest)):
        r = owner.client.post(
            f"{base}/verify", json={"answers": labels_on(model, challenge["inputs"])}, headers=h
        )
        assert r.status_code == 200, r.text
        responses.append(r)
        verdicts[name] = r.json()
    assert verdicts["knockoff"]["verdict"] == "copy", json.dumps(verdicts)
    assert verdicts["knockoff"]["p_value"] < verdicts["knockoff"]["alpha"] == 0.01
    assert verdicts["independent"]["verdict"] == "not_shown", verdicts
    assert verdicts["knockoff"]["commitment"] == challenge["commitment"]

    # the same knockoff, uploaded as a checkpoint, gets the same verdict as its answers
    suspect = upload(owner, thief, owner.tmp / "suspect", responses)
    r = owner.client.post(f"{base}/verify", json={"suspect_model_id": suspect}, headers=h)
    assert r.status_code == 200, r.text
    responses.append(r)
    assert r.json()["verdict"] == "copy" and r.json()["agreement"] == verdicts["knockoff"]["agreement"]

    # every other response of the flow: the job, its events, report (JSON and page), files
    job = f"/api/v1/jobs/{owner.job_id}"
    for path in ("", "/events?after=0", "/report", "/report.html", "/artifacts"):
        responses.append(owner.client.get(job + path, headers=h))
    for a in responses[-1].json():
        responses.append(owner.client.get(f"{job}/artifacts/{a['name']}", headers=h))
    assert all(r.is_success for r in responses), [r.status_code for r in responses]
    report = owner.client.get(f"{job}/report", headers=h).json()
    page = owner.client.get(f"{job}/report.html", headers=h).text  # what the evidence can and cannot show
    assert "Evidence of theft" in page and report["evidence"]["commitment"]["sha256"] in page
    assert "no proof of innocence" in page
    store = ArtifactStore.from_settings(owner.settings)
    stored = json.loads(store.read_named(store_names(owner.job_id)[0]))
    secret = stored["secret"]
    assert len(secret) == 64 and report["evidence"]["commitment"]["sha256"] != secret
    needles = [secret.encode(), bytes.fromhex(secret)]
    leaks = [r.url for r in responses for n in needles if n in r.content]
    assert not leaks, leaks


def test_bad_verify_requests_are_specific_problems(owner: Trained) -> None:
    base, h = f"/api/v1/models/{owner.job_id}", owner.headers
    neither = owner.client.post(f"{base}/verify", json={}, headers=h)
    assert "exactly one of suspect_model_id" in assert_problem(neither, 422)["detail"]
    short = owner.client.post(f"{base}/verify", json={"answers": [0, 1]}, headers=h)
    assert "one label per challenge input: 512, got 2" in assert_problem(short, 422)["detail"]
    out_of_range = owner.client.post(f"{base}/verify", json={"answers": [10] * 512}, headers=h)
    assert "class indices in 0..9" in assert_problem(out_of_range, 422)["detail"]
    too_many = owner.client.post(f"{base}/verify", json={"answers": [0] * 5000}, headers=h)
    assert_problem(too_many, 422)
    nobody = "00000000-0000-0000-0000-000000000000"
    unknown = owner.client.post(f"{base}/verify", json={"suspect_model_id": nobody}, headers=h)
    assert_problem(unknown, 404)
    assert_problem(owner.client.get(f"/api/v1/models/{nobody}/challenge", headers=h), 404)
    stranger = Trained(owner.settings, owner.tmp / "stranger")  # another owner: the model is not theirs
    assert_problem(stranger.client.get(f"{base}/challenge", headers=stranger.headers), 404)
    assert_problem(
        stranger.client.post(f"{base}/verify", json={"answers": [0] * 512}, headers=stranger.headers), 404
    )
