"""Third-party model servers for the remote-verification tests, started as processes: KServe's ModelServer
and MLServer (each in its own environment under .venv-servers, made by `make servers`) and a plain FastAPI
JSON route (cmim's environment). A server that cannot start fails the test with its own output."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from service_helpers import Trained, service_settings
from test_evidence_api import DATA, EVIDENCE_JOB, POOL, fit_mlp

from ml.data import load_dataset

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ROOT / ".venv-servers"
SCRIPTS = Path(__file__).resolve().parent / "remote_servers"
START_SECONDS = 120.0
# Remote runs bounded tight enough for tests (a stalled server costs 3 s, not 30).
LIMITS = {
    "predict_max_batch": 500,
    "remote_rate_per_second": 200.0,
    "remote_request_timeout_seconds": 3.0,
    "remote_time_limit_seconds": 30.0,
    "remote_backoff_seconds": 0.0,
    "remote_batch": 64,
}
_made: dict[str, Any] = {}  # what the evidence tests share in a session: one owner job, one thief


def evidence_owner(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """An owner with a job whose audit gives evidence (test_evidence_api's), made once per session."""
    if "owner" not in _made:
        tmp = tmp_path_factory.mktemp("remote")
        owner = Trained(service_settings(sqlite_url, tmp, **LIMITS), tmp)
        owner.job_id = owner.submit(EVIDENCE_JOB)
        _made["owner"] = owner
    return _made["owner"]


def thief_queries(owner: Trained) -> tuple[torch.Tensor, torch.Tensor]:
    """A label-only function-matching thief's queries (mixes of training inputs) and the served labels."""
    if "queries" not in _made:
        data = load_dataset("mnist1d", **DATA)
        g = torch.Generator().manual_seed(7)
        a, b = torch.randint(len(data.x_train), (2, POOL), generator=g)
        lam = torch.rand(POOL, 1, 1, generator=g)
        x = lam * data.x_train[a] + (1 - lam) * data.x_train[b]
        labels: list[int] = []
        for i in range(0, POOL, 500):
            r = owner.client.post(
                f"/api/v1/models/{owner.job_id}/predict", json={"inputs": x[i : i + 500].tolist()},
                headers=owner.headers,
            )  # fmt: skip
            assert r.status_code == 200, r.text
            labels += [p["label"] for p in r.json()["predictions"]]
        _made["queries"] = x, torch.tensor(labels)
    return _made["queries"]


def thief_models(owner: Trained) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the thief's knockoff, an MLP trained independently on the data), made once per session."""
    if "models" not in _made:
        x, labels = thief_queries(owner)
        data = load_dataset("mnist1d", **DATA)
        _made["models"] = fit_mlp(x, labels, seed=1), fit_mlp(data.x_train, data.y_train, seed=2)
    return _made["models"]


def server_python(name: str) -> Path:
    """The Python of one server environment; a missing one fails (never skips) the test."""
    python = SERVERS / name / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"{python} is missing: `make servers` (part of `make install`) builds the {name} environment"
        )
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(command: list[str], ready_url: str, log: Path, cwd: Path | None = None) -> Iterator[None]:
    """A server process, up once ready_url answers 200 (polled, START_SECONDS at most); stopped after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{command[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{command[:3]} not ready after {START_SECONDS:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.2)  # polling the readiness URL, bounded by the deadline above
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(owner: Trained, endpoint: dict[str, Any]) -> str:
    """POST the endpoint to verify: 202, the verification's Location, header names only."""
    r = owner.client.post(
        f"/api/v1/models/{owner.job_id}/verify", json={"suspect_endpoint": endpoint}, headers=owner.headers
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/api/v1/models/{owner.job_id}/verifications/{body['id']}"
    assert body["status"] == "running" and "headers" not in body["suspect"]
    return body["id"]


def finished(owner: Trained, vid: str, within: float = 120.0) -> dict[str, Any]:
    """The verification once it is no longer running (polled, `within` seconds at most)."""
    deadline = time.monotonic() + within
    while True:
        r = owner.client.get(f"/api/v1/models/{owner.job_id}/verifications/{vid}", headers=owner.headers)
        assert r.status_code == 200, r.text
        if r.json()["status"] != "running":
            return r.json()
        assert time.monotonic() < deadline, f"verification {vid} still running after {within} s"
        time.sleep(0.1)  # polling for the background run's end, bounded by the deadline


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """A torch classifier as an ONNX file (batch dimension dynamic, weights inside)."""
    torch.onnx.export(
        model.eval(), (torch.zeros(2, *input_shape),), str(path), input_names=["x"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
    )  # fmt: skip
    return path


@contextmanager
def kserve_server(models: dict[str, Path], tmp: Path) -> Iterator[tuple[str, Path]]:
    """KServe's ModelServer serving these ONNX files by name: (base URL, its count file)."""
    port, count = free_port(), tmp / "kserve_count.txt"
    count.write_text("")
    command = [str(server_python("kserve")), str(SCRIPTS / "kserve_onnx.py"), "--http_port", str(port)]
    command += [a for name, p in models.items() for a in ("--serve", f"{name}={p}")]
    command += ["--count_file", str(count)]
    base = f"http://127.0.0.1:{port}"
    with running(command, f"{base}/v2/health/ready", tmp / "kserve.log"):
        yield base, count


def fit_sklearn(x: np.ndarray, y: np.ndarray, path: Path, seed: int) -> Path:
    """A scikit-learn model fitted and pickled by the MLServer environment's own scikit-learn."""
    data = path.with_suffix(".npz")
    np.savez(data, x=x.reshape(len(x), -1).astype(np.float32), y=y.astype(np.int64))
    python = server_python("mlserver")
    r = subprocess.run(
        [str(python), str(SCRIPTS / "fit_sklearn.py"), str(data), str(path), str(seed)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return path


@contextmanager
def mlserver_server(models: dict[str, Path], tmp: Path) -> Iterator[str]:
    """MLServer with its scikit-learn runtime serving these joblib files by name: the base URL."""
    root = tmp / "mlserver"
    root.mkdir()
    port = free_port()
    settings = {
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    for name, path in models.items():
        (root / name).mkdir()
        model_settings = {
            "name": name,
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": str(path), "version": "v1"},
        }
        (root / name / "model-settings.json").write_text(json.dumps(model_settings))
    mlserver = SERVERS / "mlserver" / "bin" / "mlserver"
    server_python("mlserver")
    base = f"http://127.0.0.1:{port}"
    with running(
        [str(mlserver), "start", str(root)], f"{base}/v2/health/ready", tmp / "mlserver.log", cwd=root
    ):
        yield base


@contextmanager
def json_server(model: Path, tmp: Path) -> Iterator[str]:
    """The plain FastAPI JSON route serving this ONNX file: its base URL (/predict, /mode, /count)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(SCRIPTS / "json_route.py"), str(port), str(model)]
    with running(command, f"{base}/count", tmp / "json_route.log"):
        yield base


def kserve_rows(count: Path) -> dict[str, int]:
    """Rows each KServe model received, by the server's own count."""
    rows: dict[str, int] = {}
    for line in count.read_text().splitlines():
        name, n = line.split()
        rows[name] = rows.get(name, 0) + int(n)
    return rows
