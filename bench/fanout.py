"""One audit on one Celery worker against the same audit on two: wall time of the audit stage.

Starts its own API (uvicorn) and Celery workers (`--pool solo`, one CPU thread each) on a private
SQLite database, a random queue on the Redis at CMIM_BENCH_REDIS (default redis://127.0.0.1:6379/0)
and a private artifact store. Submits a 4-task audit (4 seeds, no budget phases) to one worker, then
the same audit as a new job once a second worker is ready (takes tasks): the audit stage is timed
from the job's `auditing` event to its `succeeded` event. Prints both, the ratio, and one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

JOB: dict[str, Any] = {
    "teacher": {
        "dataset": "mnist1d",
        "dataset_params": {"num_train": 2000, "num_test": 2000},
        "arch": "cnn1d",
        "objective": "cmim",
        "epochs": 3,
    },
    "audit": {
        "students": ["mlp"],
        "attacks": ["kd", "hard_label", "fm"],
        "seeds": 4,
        "epochs": 60,
        "ls_eps": [0.0, 0.1],
        "control": True,
        "output_mode": {"kind": "probs"},
        "query_budgets": [],
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """The API and workers as child processes in their own sessions, logging under tmp."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CMIM_")} | {
            "CMIM_ENVIRONMENT": "test",
            "CMIM_DATABASE_URL": f"sqlite:///{tmp / 'cmim.db'}",
            "CMIM_BROKER_URL": os.environ.get("CMIM_BENCH_REDIS", "redis://127.0.0.1:6379/0"),
            "CMIM_QUEUE_NAME": f"gpu-bench-{uuid.uuid4().hex[:8]}",
            "CMIM_ARTIFACT_URL": f"file://{tmp / 'artifacts'}",
            "CMIM_WORK_DIR": str(tmp / "work"),
            "CMIM_CACHE_DIR": str(tmp / "cache"),
            "OMP_NUM_THREADS": "1",
        }
        self.cli("db", "upgrade")
        self.key = self.cli("keys", "create", "--name", "bench").strip().splitlines()[-1]
        self.start("api", "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(self.port))
        self.wait_ready()

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode:
            raise RuntimeError(out.stderr)
        return out.stdout

    def start(self, name: str, *args: str) -> None:
        log = (self.tmp / f"{name}.log").open("w")
        self.procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start_worker(self, name: str) -> None:
        """A Celery worker, once it takes tasks: a worker still booting is not part of the fan-out."""
        self.start(name, "-m", "worker.cli", "worker", "--pool", "solo")
        log = self.tmp / f"{name}.log"
        deadline = time.monotonic() + 120
        while not re.search(r"celery@\S+ ready\.", log.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} never became ready:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)

    def wait_ready(self) -> None:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the API never became ready")

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(
            method,
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=30,
            **kw,
        )
        r.raise_for_status()
        return r.json()

    def task_seconds(self, job: str) -> dict[str, list[float]]:
        """Per worker, the seconds each of the job's audit tasks computed (from the workers' logs)."""
        pattern = re.compile(rf"job {job}: audit task \d+/\d+ \(attempt \d+\) computed in ([\d.]+) s")
        return {
            log.stem: [float(x) for x in pattern.findall(log.read_text(errors="replace"))]
            for log in sorted(self.tmp.glob("worker-*.log"))
        }

    def audit_seconds(self) -> tuple[float, str]:
        """Submit the job, wait for it; (the time from `auditing` to `succeeded`, the job's id)."""
        job = self.call("POST", "/api/v1/jobs", json=JOB)["id"]
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            status = self.call("GET", f"/api/v1/jobs/{job}")["status"]
            if status in {"failed", "cancelled"}:
                raise RuntimeError(f"job {job} {status}")
            if status == "succeeded":
                break
            time.sleep(0.5)
        events = self.call("GET", f"/api/v1/jobs/{job}/events", params={"after": 0})
        at = {e["data"]["status"]: e["created_at"] for e in events if e["kind"] == "status"}
        wall = datetime.fromisoformat(at["succeeded"]) - datetime.fromisoformat(at["auditing"])
        return wall.total_seconds(), job

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)


def report(service: Service, label: str, wall: float, job: str) -> None:
    """The audit's wall time, each worker's task times, and what the wall time holds beyond the busiest
    worker's tasks (plan, hand-off, queueing, the callback's assembly)."""
    tasks = service.task_seconds(job)
    busiest = max((sum(t) for t in tasks.values()), default=0.0)
    per_worker = "; ".join(f"{w} {' + '.join(f'{t:.1f}' for t in ts) or '-'}" for w, ts in tasks.items())
    print(
        f"{label} 4-task audit in {wall:.1f} s; tasks computed ({per_worker}) s; "
        f"beyond the busiest worker's tasks {wall - busiest:.1f} s",
        flush=True,
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cmim-fanout-") as tmp:
        service = Service(Path(tmp))
        try:
            service.start_worker("worker-1")
            one, job_one = service.audit_seconds()
            report(service, "1 worker: ", one, job_one)
            service.start_worker("worker-2")
            two, job_two = service.audit_seconds()
            report(service, "2 workers:", two, job_two)
            print(f"ratio 2 workers / 1 worker: {two / one:.3f} (target <= 0.65)")
            print(json.dumps({"one_worker_s": one, "two_workers_s": two, "ratio": two / one}))
        finally:
            service.close()


if __name__ == "__main__":
    main()
