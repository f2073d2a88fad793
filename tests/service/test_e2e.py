"""End to end with real processes: uvicorn + a Celery worker on Redis and PostgreSQL, and `cmim serve`
on its embedded default (SQLite + local worker). Jobs are tiny so the whole file runs in about a minute."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file
from service_helpers import assert_problem, job_body

from app.core.migrate import upgrade
from ml.checkpoint import load_checkpoint
from ml.oracle import OutputMode, apply_output_mode

TERMINAL = {"succeeded", "failed", "cancelled"}
# Slow enough to act on mid-training (2,000 samples, 60 epochs), still seconds on a CPU.
LONG_TEACHER = {"teacher.dataset_params": {"num_train": 2000, "num_test": 500}, "teacher.epochs": 60}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process in its own session, logging to a file, ended by its own pid at teardown."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.log = name, log_dir / f"{name}.log"
        self.popen = subprocess.Popen(
            args, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class Stack:
    """The service's processes for one test module and an HTTP client for it."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp, self.procs = env, tmp, []
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.key = ""

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(name, [sys.executable, *args], self.env, self.tmp)
        self.procs.append(proc)
        return proc

    def wait_healthy(self, proc: Proc, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.output()}"
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        pytest.fail(f"{proc.name} never became ready:\n{proc.output()}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.base + path, headers=self.headers, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.base + path, headers=self.headers, timeout=30, **kw)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-4000:]}" for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.stop()


def make_key(env: dict[str, str], name: str = "e2e") -> str:
    """A new API key, made by the `cmim keys create` command against env's database."""
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "keys", "create", "--name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMIM_")}
    return (
        env
        | {
            "CMIM_ENVIRONMENT": "test",
            "CMIM_ARTIFACT_URL": f"file://{tmp / 'artifacts'}",
            "CMIM_WORK_DIR": str(tmp / "work"),
            "CMIM_CACHE_DIR": str(tmp / "cache"),
            "CMIM_LEASE_SECONDS": "5",
            "CMIM_HEARTBEAT_SECONDS": "1",
            "CMIM_SWEEP_SECONDS": "1",
            "CMIM_POLL_SECONDS": "0.2",
            "CMIM_MAX_ATTEMPTS": "3",
            "OMP_NUM_THREADS": "1",  # the API and a worker share 2 cores
        }
        | extra
    )


def follow(stack: Stack, job_id: str, timeout: float = 240, until: Any = None) -> list[dict[str, Any]]:
    """Read the job's SSE stream until the job ends (or until(event) is true); returns the events."""
    events: list[dict[str, Any]] = []
    last_id = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # reconnects with Last-Event-ID if the stream drops
        headers = stack.headers | {"Last-Event-ID": str(last_id)}
        with httpx.stream(
            "GET",
            f"{stack.base}/api/v1/jobs/{job_id}/events",
            headers=headers,
            timeout=httpx.Timeout(30, read=30),
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            frame: dict[str, Any] = {}
            for line in r.iter_lines():
                if line.startswith("id: "):
                    frame["id"] = int(line[4:])
                elif line.startswith("event: "):
                    frame["kind"] = line[7:]
                elif line.startswith("data: "):
                    frame |= json.loads(line[6:])
                elif line == "" and "id" in frame:
                    events.append(frame)
                    last_id = frame["id"]
                    if until is not None and until(frame):
                        return events
                    if frame["kind"] == "status" and frame["data"]["status"] in TERMINAL:
                        return events
                    frame = {}
                if time.monotonic() > deadline:
                    break
    pytest.fail(f"job {job_id} did not finish in {timeout} s:\n{stack.logs()}")


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["status"] for e in events if e["kind"] == "status"]


def check_succeeded_job(stack: Stack, job_id: str) -> None:
    """Report complete; checkpoint downloads intact and loads; the served answers equal the local model's."""
    job = stack.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    report = stack.get(f"/api/v1/jobs/{job_id}/report").json()
    assert report["verdict"] in {"undistillable", "distillable", "inconclusive"} and report["verdict_reason"]
    assert 0 <= report["teacher"]["accuracy"] <= 100 and report["teacher"]["cmi_test"]
    assert report["control"]["students"]["mlp"]["attacks"] and report["students"]["mlp"]["ls"]
    html = stack.get(f"/api/v1/jobs/{job_id}/report.html")
    assert html.status_code == 200 and "<svg" in html.text
    artifacts = {a["name"]: a for a in stack.get(f"/api/v1/jobs/{job_id}/artifacts").json()}
    published = {"model.safetensors", "model.json", "report.json", "monitor.json", "serving.json"}
    assert set(artifacts) == published
    files = {}
    for name in ("model.safetensors", "model.json"):
        r = stack.get(artifacts[name]["url"])
        digest = hashlib.sha256(r.content).hexdigest()
        assert digest == artifacts[name]["sha256"] and r.headers["etag"] == f'"{digest}"'
        files[name] = stack.tmp / f"{job_id}-{name}"
        files[name].write_bytes(r.content)
    assert load_file(str(files["model.safetensors"]))  # plain safetensors, no pickle
    model, meta = load_checkpoint(files["model.safetensors"], files["model.json"])
    x = torch.randn(4, *meta.input_shape, generator=torch.Generator().manual_seed(0))
    body = {
        "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}
        ]
    }
    r = stack.post(f"/v2/models/{job_id}/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    with torch.no_grad():
        mode = OutputMode.model_validate(report["threat_model"]["output_mode"])
        expected = apply_output_mode(torch.softmax(model(x), -1), mode)
    served = torch.tensor(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-6)


def submit(stack: Stack, body: dict[str, Any]) -> str:
    r = stack.post("/api/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


# ------------------------------------------------------------- deployed: uvicorn, Celery, Redis, PostgreSQL


@pytest.fixture(scope="module")
def deployed(pg_databases, redis_url, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("deployed")
    url = pg_databases.create()  # its own database: the worker's sweep must not run other tests' jobs
    upgrade(url)
    env = base_env(
        tmp,
        CMIM_DATABASE_URL=url,
        CMIM_BROKER_URL=redis_url,
        CMIM_QUEUE_NAME=f"gpu-test-{uuid.uuid4().hex[:8]}",
    )
    stack = Stack(env, tmp)
    stack.key = make_key(env)
    api = stack.start("api", "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(stack.port))
    stack.start("worker-1", "-m", "worker.cli", "worker", "--pool", "solo")
    try:
        stack.wait_healthy(api)
        yield stack
    finally:
        stack.close()


def test_deployed_job_runs_to_a_complete_report(deployed: Stack) -> None:
    assert deployed.get("/readyz").json() == {"status": "ok", "database": "ok", "broker": "ok"}
    job_id = submit(deployed, job_body())
    events = follow(deployed, job_id)
    assert statuses(events) == ["queued", "training", "auditing", "succeeded"], deployed.logs()
    epochs = [(e["data"]["stage"], e["data"]["epoch"]) for e in events if e["kind"] == "epoch"]
    assert epochs == [
        ("teacher", 1),
        ("teacher", 2),
        ("teacher", 3),
        ("control", 1),
        ("control", 2),
        ("control", 3),
    ]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    check_succeeded_job(deployed, job_id)


def test_deployed_cancel_stops_within_one_epoch(deployed: Stack) -> None:
    job_id = submit(deployed, job_body(**LONG_TEACHER | {"teacher.epochs": 400}))
    follow(deployed, job_id, until=lambda e: e["kind"] == "epoch")
    r = deployed.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    events = follow(deployed, job_id, timeout=60)
    assert statuses(events)[-1] == "cancelled", deployed.logs()
    kinds = [e["kind"] for e in events]
    after_request = kinds[kinds.index("cancel_requested") :]
    assert after_request.count("epoch") <= 1  # the epoch under way when the flag was set, no more
    assert_problem(deployed.get(f"/api/v1/jobs/{job_id}/report"), 409)
    assert deployed.get(f"/api/v1/jobs/{job_id}/artifacts").json() == []


# ---------------------------------------------------------------- embedded: `cmim serve` on SQLite


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("embedded")
    env = base_env(tmp, CMIM_DATABASE_URL=f"sqlite:///{tmp / 'cmim.db'}")
    stack = Stack(env, tmp)
    serve = stack.start("serve", "-m", "worker.cli", "serve", "--port", str(stack.port))
    try:
        stack.wait_healthy(serve)
        deadline = time.monotonic() + 10
        while "API key (shown once): " not in serve.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        stack.key = serve.output().split("API key (shown once): ")[1].split()[0]
        yield stack
    finally:
        stack.close()


def test_embedded_serve_runs_a_job_without_redis_or_postgresql(embedded: Stack) -> None:
    assert embedded.get("/readyz").json() == {"status": "ok", "database": "ok"}
    assert "docs: " in embedded.procs[0].output()
    assert embedded.get("/docs").status_code == 200
    job_id = submit(embedded, job_body())
    events = follow(embedded, job_id)
    assert statuses(events) == ["queued", "training", "auditing", "succeeded"], embedded.logs()
    check_succeeded_job(embedded, job_id)
    assert not (embedded.tmp / "artifacts" / "audit-results" / job_id).exists()  # the report holds them


def embedded_worker(stack: Stack) -> int | None:
    """The pid of `cmim serve`'s embedded worker: its spawned child (not the resource tracker)."""
    parent = stack.procs[0].popen.pid
    for d in Path("/proc").iterdir():
        try:
            stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes()
        except (OSError, NotADirectoryError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmd:
            return int(d.name)
    return None


def test_an_embedded_worker_killed_mid_job_is_started_again_and_the_job_resumes(embedded: Stack) -> None:
    # a teacher of 40 epochs on 2,000 examples: still training when the first epoch's progress is read
    body = job_body(**{"teacher.epochs": 40, "teacher.dataset_params": {"num_train": 2000, "num_test": 500}})
    job_id = submit(embedded, body)
    follow(embedded, job_id, until=lambda e: e["kind"] == "epoch")  # training: the job holds a lease
    assert embedded.get(f"/api/v1/jobs/{job_id}").json()["status"] == "training"
    victim = embedded_worker(embedded)
    assert victim is not None, embedded.logs()
    os.kill(victim, signal.SIGKILL)
    events = follow(embedded, job_id, timeout=300)
    job = embedded.get(f"/api/v1/jobs/{job_id}").json()
    assert statuses(events)[-1] == "succeeded" and job["attempts"] == 2, embedded.logs()
    serve = embedded.procs[0].output()
    assert "the embedded worker ended (exit code -9)" in serve and "resuming 1 job(s)" in serve, serve[-3000:]
    assert embedded_worker(embedded) not in (None, victim)  # the server itself still runs the new one
