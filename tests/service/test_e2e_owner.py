"""An owner's own model end to end, with real processes (uvicorn + Celery on Redis and PostgreSQL, and
`cmim serve` on SQLite): the README's walk-through run as written (curl and jq, on tiny audit settings),
then the served ONNX model's answers compared with onnxruntime's own, and the README's load benchmark."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from test_e2e import Stack, deployed, embedded  # noqa: F401 - the module's fixtures

ROOT = Path(__file__).parents[2]
# The README's sizes, shrunk so that both jobs take seconds: one seed of one epoch, a 2-epoch control
# (and fine-tuning), one query budget of 500.
SHRINK = {
    '"seeds": 2, "epochs": 20': '"seeds": 1, "epochs": 1',
    '"query_budgets": [4000, 20000]': '"query_budgets": [500]',
    '"epochs": 30': '"epochs": 2',
    '"epochs": 10': '"epochs": 2',
}


def walkthrough() -> str:
    """The shell commands of the README's section on an owner's own model, as one bash script."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own model")[1].split("\nWithout a server")[0]
    lines = [line.strip() for line in section.splitlines() if line.startswith("       ")]
    script = "\n".join(lines).replace("\\\n", " ")
    for old, new in SHRINK.items():
        assert old in script, old
        script = script.replace(old, new)
    return script


def run_owner_walkthrough(stack: Stack, owner_example: Path, tmp: Path) -> None:
    folder = tmp / "owner"
    shutil.copytree(owner_example, folder, dirs_exist_ok=True)
    script = "set -euo pipefail\n" + walkthrough().replace("localhost:8000", f"127.0.0.1:{stack.port}")
    env = os.environ | {"KEY": stack.key}
    done = subprocess.run(
        ["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{stack.logs()}"
    assert '"verdict"' in done.stdout and '"fine_tune"' in done.stdout
    assert "probabilities" in done.stdout  # the last step's answer

    jobs = stack.get("/api/v1/jobs").json()["items"]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], stack.logs()
    tuned, onnx_job = (stack.get(f"/api/v1/jobs/{j['id']}").json() for j in jobs)  # newest first
    assert tuned["spec"]["teacher"]["fine_tune"] and not onnx_job["spec"]["teacher"]["fine_tune"]

    report = stack.get(f"/api/v1/jobs/{onnx_job['id']}/report").json()
    assert report["teacher"]["accuracy"] > 70 and report["control"]["arch"] == "mlp"
    assert report["students"]["mlp"]["attacks"] and report["control"]["students"]["mlp"]["attacks"]
    assert report["verdict"] in {"distillable", "undistillable", "inconclusive"} and report["statement"]
    assert report["safe_budget"]["teacher"]  # the served per-key budget comes from here
    fine = stack.get(f"/api/v1/jobs/{tuned['id']}/report").json()["fine_tune"]
    assert fine["acc_before"] > 70 and "acc_after" in fine

    # Served as audited (label only, the default): the one-hot of onnxruntime's own argmax.
    x = np.random.default_rng(0).normal(size=(8, 20)).astype(np.float32)
    session = ort.InferenceSession((folder / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    body = {"inputs": [{"name": "input", "shape": [8, 20], "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = stack.post(f"/v2/models/{onnx_job['id']}/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    served = np.asarray(out["probabilities"]["data"]).reshape(8, 5)
    np.testing.assert_array_equal(served, torch.eye(5)[logits.argmax(-1)].numpy())
    assert out["label"]["data"] == logits.argmax(-1).tolist()

    # The README's load benchmark (it starts its own servers), on a handful of requests.
    line = next(
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if "bench/predict_load.py" in line
    )
    argv = line.split("  #")[0].split()[1:]
    argv += ["--requests", "20", "--warmup", "2", "--rounds", "1", "--batches", "1", "--clients", "1"]
    argv += ["--max-seconds", "60"]
    bench = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert bench.returncode == 0, bench.stderr[-2000:]
    cell = json.loads(bench.stdout.splitlines()[-1])["cells"][0]
    assert cell["ours"]["ok"] == cell["ours"]["sent"] == 20, cell


def test_deployed_owner_model_walkthrough(deployed: Stack, owner_example: Path, tmp_path: Path) -> None:  # noqa: F811
    run_owner_walkthrough(deployed, owner_example, tmp_path)


def test_embedded_owner_model_walkthrough(embedded: Stack, owner_example: Path, tmp_path: Path) -> None:  # noqa: F811
    run_owner_walkthrough(embedded, owner_example, tmp_path)
