"""Owners' own models through the API: uploads (and every refusal), jobs on them, serving them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from owner_models import edited_checkpoint, external_data_onnx, linear_onnx
from service_helpers import Trained, assert_problem, service_settings

from ml.checkpoint import load_checkpoint

# An audit small enough for seconds on a CPU; served with full probabilities (comparable to onnxruntime).
TINY_AUDIT: dict[str, Any] = {
    "students": ["mlp"],
    "attacks": ["hard_label"],
    "seeds": 1,
    "epochs": 1,
    "ls_eps": [0.0],
    "ls_mixup": False,
    "output_mode": {"kind": "probs"},
    "query_budgets": [],
}


@pytest.fixture
def owner(db_url: str, tmp_path: Path, owner_example: Path) -> Trained:
    owner = Trained(service_settings(db_url, tmp_path), tmp_path)
    r = owner.client.post(
        "/api/v1/datasets?name=tabular",
        content=(owner_example / "tabular.npz").read_bytes(),
        headers=owner.headers | {"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["input_shape"] == [20] and r.json()["num_classes"] == 5  # labels 1..5: 5 classes
    owner.dataset_id = r.json()["id"]  # type: ignore[attr-defined]
    return owner


def upload(owner: Trained, files: dict[str, Any], **fields: str) -> Any:
    return owner.client.post("/api/v1/models", files=files, data=fields, headers=owner.headers)


def objects(owner: Trained) -> list[Path]:
    return sorted((owner.tmp / "artifacts").rglob("objects/**/*[0-9a-f]"))


def tiny_job(owner: Trained, model_id: str, teacher: dict[str, Any] | None = None, **audit: Any) -> dict:
    return {
        "teacher": {"dataset": "npz", "model_id": model_id, "epochs": 2, **(teacher or {})},
        "dataset_id": owner.dataset_id,  # type: ignore[attr-defined]
        "audit": TINY_AUDIT | audit,
    }


def report_of(owner: Trained, job_id: str) -> dict[str, Any]:
    r = owner.client.get(f"/api/v1/jobs/{job_id}/report", headers=owner.headers)
    assert r.status_code == 200, r.text
    return r.json()


def infer(owner: Trained, job_id: str, x: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    r = owner.client.post(f"/v2/models/{job_id}/infer", json=body, headers=owner.headers)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_every_bad_model_is_refused_specifically_and_nothing_is_stored(
    owner: Trained, owner_example: Path, tmp_path: Path
) -> None:
    ds = owner.dataset_id  # type: ignore[attr-defined]
    ckpt = owner_example / "checkpoint"

    def checkpoint(folder: Path) -> dict[str, Any]:
        return {
            "file": ("model.safetensors", (folder / "model.safetensors").read_bytes()),
            "config": ("model.json", (folder / "model.json").read_bytes()),
        }

    before = objects(owner)
    cases = [
        ({"file": ("m.onnx", linear_onnx(outputs=2))}, "exactly one output (batch, classes); it has 2"),
        ({"file": ("m.onnx", linear_onnx(classes=3))}, "answers 3 classes but the data set has 5"),
        ({"file": ("m.onnx", linear_onnx(domain="com.evil"))}, "custom operator domain 'com.evil'"),
        ({"file": ("m.onnx", external_data_onnx(tmp_path))}, "use external data files"),
        ({"file": ("m.onnx", b"\x08\xff garbage, not a protobuf" * 20)}, "not an ONNX model"),
        ({"file": ("m.onnx", linear_onnx(batch=1))}, "has no dynamic batch axis"),
        (
            {"file": ("m.onnx", linear_onnx(features=21))},
            "input is (batch, 21) but the data's examples are (20,)",
        ),
        (
            checkpoint(edited_checkpoint(ckpt, tmp_path / "keys", {"1.1.weight": "1.fc.weight"})),
            "missing keys [1.1.weight], unexpected keys [1.fc.weight]",
        ),
        (
            checkpoint(
                edited_checkpoint(ckpt, tmp_path / "shapes", num_classes=3, class_names=["a", "b", "c"])
            ),
            "wrong shapes: 1.5.weight (5, 128) (expected (3, 128)); 1.5.bias (5,) (expected (3,))",
        ),
        (checkpoint(edited_checkpoint(ckpt, tmp_path / "arch", arch="nope")), "unknown model 'nope'"),
    ]
    for files, detail in cases:
        body = assert_problem(upload(owner, files, dataset_id=ds), 422)
        assert detail in body["detail"], (detail, body["detail"])
    small = Trained(
        service_settings(owner.settings.database_url, tmp_path, upload_max_bytes=50_000), tmp_path
    )
    small.headers = owner.headers
    big = (owner_example / "model.onnx").read_bytes()
    assert len(big) > 50_000
    refused = assert_problem(upload(small, {"file": ("m.onnx", big)}), 413)
    assert "over the 50,000-byte limit" in refused["detail"]
    assert "multipart/form-data" in assert_problem(upload(owner, {}, name="x"), 415)["detail"]
    listed = owner.client.get("/api/v1/models", headers=owner.headers).json()
    assert listed == {"items": [], "next_cursor": None}
    assert objects(owner) == before  # only the data set's object


def test_onnx_model_is_uploaded_audited_with_a_named_control_and_served_as_onnxruntime_answers(
    owner: Trained, owner_example: Path
) -> None:
    onnx_bytes = (owner_example / "model.onnx").read_bytes()
    r = upload(owner, {"file": ("model.onnx", onnx_bytes)}, dataset_id=owner.dataset_id, name="mine")  # type: ignore[attr-defined]
    assert r.status_code == 201, r.text
    model = r.json()
    assert (model["format"], model["input_shape"], model["num_classes"]) == ("onnx", [20], 5)
    assert model["class_names"] == ["1", "2", "3", "4", "5"]
    assert owner.client.get(r.headers["location"], headers=owner.headers).json() == model
    assert [m["id"] for m in owner.client.get("/api/v1/models", headers=owner.headers).json()["items"]] == [
        model["id"]
    ]
    job_id = owner.submit(tiny_job(owner, model["id"], control_arch="mlp"))
    report = report_of(owner, job_id)
    assert report["teacher"]["accuracy"] > 70 and report["teacher"]["uploaded_model_id"] == model["id"]
    assert report["control"]["arch"] == "mlp" and report["control"]["students"]["mlp"]["attacks"]
    assert report["verdict"] in {"distillable", "undistillable", "inconclusive"} and report["statement"]
    x = np.random.default_rng(0).normal(size=(6, 20)).astype(np.float32)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    expected = torch.softmax(torch.from_numpy(logits), -1).numpy()
    np.testing.assert_allclose(infer(owner, job_id, x), expected, rtol=1e-5, atol=1e-6)
    meta = owner.client.get(f"/v2/models/{job_id}", headers=owner.headers).json()
    assert meta["platform"] == "onnxruntime_onnx" and meta["parameters"]["arch"] == "onnx"
    simple = owner.client.post(
        f"/api/v1/models/{job_id}/predict", json={"inputs": x[:2].tolist()}, headers=owner.headers
    )
    assert simple.status_code == 200, simple.text
    assert [p["class_name"] for p in simple.json()["predictions"]] == [
        str(i + 1) for i in logits[:2].argmax(-1)
    ]


def test_onnx_without_a_control_architecture_is_audited_without_control_and_never_undistillable(
    owner: Trained, owner_example: Path
) -> None:
    r = upload(owner, {"file": ("model.onnx", (owner_example / "model.onnx").read_bytes())})
    assert r.status_code == 201, r.text  # no data set: the model declares its own inputs and classes
    model_id = r.json()["id"]
    bad = owner.client.post(
        "/api/v1/jobs", json=tiny_job(owner, model_id, {"fine_tune": True}), headers=owner.headers
    )
    assert "fine-tuning needs a zoo checkpoint" in assert_problem(bad, 422)["detail"]
    job_id = owner.submit(tiny_job(owner, model_id))
    report = report_of(owner, job_id)
    assert report["control"] is None and report["verdict"] != "undistillable"
    assert "no CE control was run" in report["verdict_reason"]


def test_checkpoint_fine_tuned_with_cmim_reports_accuracy_before_after_and_warns_when_it_hurts(
    owner: Trained, owner_example: Path
) -> None:
    folder = owner_example / "checkpoint"
    files = {
        "file": ("model.safetensors", (folder / "model.safetensors").read_bytes()),
        "config": ("model.json", (folder / "model.json").read_bytes()),
    }
    r = upload(owner, files, dataset_id=owner.dataset_id)  # type: ignore[attr-defined]
    assert r.status_code == 201, r.text
    assert (r.json()["format"], r.json()["arch"]) == ("checkpoint", "mlp")
    # Made to hurt: a learning rate of 0.5 wrecks the trained weights in the first steps.
    teacher = {"fine_tune": True, "objective": "cmim", "lr": 0.5, "warmup_epochs": 0}
    job_id = owner.submit(tiny_job(owner, r.json()["id"], teacher))
    report = report_of(owner, job_id)
    tune = report["fine_tune"]
    assert tune["acc_before"] > 70 and tune["acc_after"] < tune["acc_before"] - 0.5
    assert tune["warning"] and "fine-tuning cost" in tune["warning"]
    events = owner.client.get(f"/api/v1/jobs/{job_id}/events?after=0", headers=owner.headers).json()
    warnings = [e for e in events if e["kind"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["data"]["message"] == tune["warning"]
    assert report["control"]["arch"] == "mlp"  # the control is the owner's own architecture
    job = owner.client.get(f"/api/v1/jobs/{job_id}", headers=owner.headers).json()
    assert job["spec"]["teacher"]["arch"] == "mlp"
    local, meta = load_checkpoint(
        owner.download(job_id, "model.safetensors"), owner.download(job_id, "model.json")
    )
    assert meta.mean == json.loads((folder / "model.json").read_text())["mean"]  # its own standardisation
    x = np.random.default_rng(1).normal(size=(4, 20)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(local(torch.from_numpy(x)), -1).numpy()
    np.testing.assert_allclose(infer(owner, job_id, x), expected, rtol=1e-5, atol=1e-6)


def test_a_job_refuses_an_unknown_or_mismatched_model(owner: Trained) -> None:
    r = upload(owner, {"file": ("m.onnx", linear_onnx(features=12, classes=3))})
    assert r.status_code == 201, r.text
    mismatched = owner.client.post(
        "/api/v1/jobs", json=tiny_job(owner, r.json()["id"]), headers=owner.headers
    )
    assert "takes (12,) with 3 classes" in assert_problem(mismatched, 422)["detail"]
    unknown = owner.client.post(
        "/api/v1/jobs", json=tiny_job(owner, "00000000-0000-0000-0000-000000000000"), headers=owner.headers
    )
    assert_problem(unknown, 422)
    no_model = tiny_job(owner, "00000000-0000-0000-0000-000000000000", {"fine_tune": True, "arch": "mlp"})
    no_model["teacher"]["model_id"] = None
    r = owner.client.post("/api/v1/jobs", json=no_model, headers=owner.headers)
    assert "fine_tune needs teacher.model_id" in assert_problem(r, 422)["detail"]


def test_a_checkpoint_cmim_train_wrote_registers_and_tabular_augmentation_is_checked(
    owner: Trained, tmp_path: Path
) -> None:
    from ml.checkpoint import save_checkpoint
    from ml.train import TrainConfig, train_model

    cfg = TrainConfig(dataset="digits", arch="mlp", objective="ce", epochs=1, device="cpu")
    trained = train_model(cfg)
    weights, config = save_checkpoint(trained.model, trained.meta, tmp_path / "cli")
    files = {
        "file": ("model.safetensors", weights.read_bytes()),
        "config": ("model.json", config.read_bytes()),
    }
    r = upload(owner, files)
    assert r.status_code == 201, r.text
    assert (r.json()["arch"], r.json()["input_shape"], r.json()["num_classes"]) == ("mlp", [1, 8, 8], 10)
    body = tiny_job(owner, r.json()["id"])
    body["teacher"] |= {"model_id": None, "arch": "mlp", "augmentation": "shift_noise"}
    shifted = owner.client.post("/api/v1/jobs", json=body, headers=owner.headers)
    assert "'shift_noise' does not fit inputs of shape (20,)" in assert_problem(shifted, 422)["detail"]
