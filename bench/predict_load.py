"""Load benchmark of `POST /v2/models/{id}/infer` against a plain FastAPI route, both measured in one run.

Trains a tiny model through the job pipeline (mnist1d, cnn1d) in a temporary directory, then starts two
uvicorn processes on loopback: ours (`app.main:create_app`, embedded mode, or with `--redis URL` the
deployed limits in Redis) and a plain FastAPI app that runs the same checkpoint with no auth, no rate
limit and no budget. Our key has a budget that never runs out but is enforced in full: the per-key,
owner and global caps are all checked and charged on every request. For batch 1 and 64 and 1 and 8
clients it sends `--requests` requests per cell (keep-alive connections, a lean raw HTTP client so that
the client takes little of the CPU the servers need) and prints p50/p99 latency, throughput and the ratio
ours / plain per cell, then one JSON line. On a small box the client competes with the server: the JSON
has the load average.

    .venv/bin/python bench/predict_load.py                       # embedded (in-process limits)
    .venv/bin/python bench/predict_load.py --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parent.parent
BIG = 2_000_000_000  # a budget this run cannot exhaust (the column is a 32-bit integer)
JOB = {
    "teacher": {
        "dataset": "mnist1d",
        "dataset_params": {"num_train": 1000, "num_test": 500},
        "arch": "cnn1d",
        "objective": "cmim",
        "epochs": 3,
        "seed": 0,
    },
    "audit": {
        "students": ["mlp"],
        "attacks": ["hard_label"],
        "seeds": 1,
        "epochs": 1,
        "ls_eps": [0.0],
        "ls_mixup": False,
        "control": False,
        "output_mode": {"kind": "probs"},
        "query_budgets": [],
    },
}


def plain_app() -> FastAPI:
    """The baseline: the same checkpoint behind one FastAPI route, parsed with the same schema, no auth."""
    import torch

    from app.api.schemas import InferRequest
    from ml.checkpoint import load_checkpoint

    model, _ = load_checkpoint(os.environ["BENCH_WEIGHTS"], os.environ["BENCH_CONFIG"])
    model.eval()
    app = FastAPI()

    @app.post("/infer")
    async def infer(request: Request) -> Response:
        body = InferRequest.model_validate_json(await request.body())
        t = body.inputs[0]
        x = torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(t.shape))
        with torch.inference_mode():
            p = torch.softmax(model(x).float(), -1)
        out = [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": list(p.shape),
                "data": p.flatten().tolist(),
            },
            {"name": "label", "datatype": "INT64", "shape": [len(p)], "data": p.argmax(-1).tolist()},
        ]
        return Response(json.dumps({"model_name": "plain", "outputs": out}), media_type="application/json")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    return sorted_values[max(math.ceil(q / 100 * len(sorted_values)), 1) - 1]


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a keep-alive connection and read the whole response; returns the status."""
    writer.write(request)
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load(port: int, request: bytes, requests: int, clients: int, deadline: float) -> Run:
    """`clients` connections send `request` back to back until `requests` were sent; latency of each."""
    run = Run()
    sent = 0

    async def client() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while sent < requests and time.monotonic() < deadline:
            sent += 1
            t = time.perf_counter()
            status = await _one(reader, writer, request)
            run.statuses[status] += 1
            if status == 200:
                run.latencies.append(time.perf_counter() - t)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    run.wall += time.perf_counter() - t0
    return run


@dataclass
class Run:
    """Latencies of the answered requests, statuses, and the wall time, summed over rounds."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    wall: float = 0.0

    def add(self, other: Run) -> None:
        self.latencies += other.latencies
        self.statuses += other.statuses
        self.wall += other.wall

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
        return {
            "sent": sum(self.statuses.values()),
            "ok": len(lat),
            "statuses": dict(self.statuses),
            "wall_s": round(self.wall, 3),
            "throughput_rps": round(len(lat) / self.wall, 1) if self.wall else 0.0,
            "p50_ms": ms(percentile(lat, 50)),
            "p99_ms": ms(percentile(lat, 99)),
        }


def http_request(path: str, body: bytes, key: str | None, binary_header: int | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    kind = "application/json" if binary_header is None else "application/octet-stream"
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: {kind}\r\n"
    if binary_header is not None:
        head += f"Inference-Header-Content-Length: {binary_header}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def binary_body(x: np.ndarray) -> tuple[bytes, int]:
    """A v2 request with x as binary tensor data, all outputs asked in binary; (body, JSON header size)."""
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    head = json.dumps(
        {
            "inputs": [tensor | {"parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return head + x.tobytes(), len(head)


def unmonitored_copy(database_url: str, job_id: Any) -> str:
    """Another model id for the same checkpoint without the extraction monitor (no monitor.json): the
    baseline of the monitor's overhead, served by the same process."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.core.models import MONITOR_NAME, Artifact, Job

    with session_scope(database_url) as s:
        job = s.get(Job, job_id)
        fields = ("owner_id", "status", "spec", "request_hash", "max_attempts")
        copy = Job(**{f: getattr(job, f) for f in fields})
        s.add(copy)
        s.flush()
        for a in s.scalars(select(Artifact).where(Artifact.job_id == job.id, Artifact.name != MONITOR_NAME)):
            names = ("owner_id", "name", "kind", "media_type", "sha256", "size_bytes", "storage_key")
            s.add(Artifact(job_id=copy.id, **{f: getattr(a, f) for f in names}))
        return str(copy.id)


def train(tmp: Path, database_url: str) -> tuple[str, str, Path, Path]:
    """A tiny model trained through the job pipeline; returns (model id, key, weights, config)."""
    from sqlalchemy import select

    from app.core.config import Settings
    from app.core.db import session_scope
    from app.core.keys import create_api_key
    from app.core.migrate import upgrade
    from app.core.models import ApiKey, Artifact
    from app.services.jobs import create_job
    from app.services.schemas import JobCreate
    from worker.pipeline import run_job

    settings = Settings(
        environment="test",
        database_url=database_url,
        artifact_url=f"file://{tmp / 'artifacts'}",
        work_dir=str(tmp / "work"),
        cache_dir=str(tmp / "cache"),
    )
    upgrade(database_url)
    with session_scope(database_url) as s:
        admin, _ = create_api_key(s)
        owner = admin.owner_id
        # The benchmark's key: predict only, a budget it cannot exhaust (still checked and charged).
        _, secret = create_api_key(
            s, owner_id=owner, scopes=["models:predict"], query_budget=BIG, rate_limit_per_minute=BIG
        )
    with session_scope(database_url) as s:
        job, _ = create_job(s, settings, s.get(ApiKey, admin.id), JobCreate.model_validate(JOB), None)
    assert run_job(job.id, settings) == "succeeded", "the benchmark's model failed to train"
    with session_scope(database_url) as s:
        keys = {a.name: a.storage_key for a in s.scalars(select(Artifact).where(Artifact.job_id == job.id))}
    root = tmp / "artifacts"
    return str(job.id), secret, root / keys["model.safetensors"], root / keys["model.json"]


def start(args: list[str], env: dict[str, str], log: Path, port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", *args, "--port", str(port), "--no-access-log"],
        env=env,
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=2)
            return proc
        except httpx.TransportError:
            time.sleep(0.3)
    sys.exit(f"server never came up:\n{log.read_text()}")


async def matrix(
    args: argparse.Namespace, ours: tuple[int, str, str], plain_port: int, unmonitored: str
) -> list[dict]:
    port, model, key = ours
    rows = []
    for batch in args.batches:
        x = np.random.default_rng(0).standard_normal((batch, 1, 40)).astype(np.float32)
        body = json.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
                ]
            }
        ).encode()
        targets = {
            "ours": (port, http_request(f"/v2/models/{model}/infer", body, key)),
            "plain": (plain_port, http_request("/infer", body, None)),
            # the same checkpoint in the same server, without the extraction monitor
            "unmonitored": (port, http_request(f"/v2/models/{unmonitored}/infer", body, key)),
        }
        if args.binary:  # the binary tensor extension, as tritonclient sends it by default
            raw, header = binary_body(x)
            targets["ours_binary"] = (port, http_request(f"/v2/models/{model}/infer", raw, key, header))
        for clients in args.clients:
            cell: dict = {"batch": batch, "clients": clients}
            runs = {name: Run() for name in targets}
            deadline = time.monotonic() + args.max_seconds
            before = os.getloadavg()[0]
            for p, request in targets.values():
                await load(p, request, args.warmup, clients, deadline)
            # Rounds alternate between the two servers, so that a change in the machine's load (other
            # processes) weighs on both alike and the ratio stays fair.
            for _ in range(args.rounds):
                for name, (p, request) in targets.items():
                    runs[name].add(await load(p, request, args.requests // args.rounds, clients, deadline))
            for name in targets:
                cell[name] = runs[name].summary() | {"loadavg_before": round(before, 2)}
            for name in targets:
                if not cell[name]["ok"]:
                    sys.exit(f"{name} answered no request: {cell[name]['statuses']}")
            cell["ratio"] = round(cell["ours"]["throughput_rps"] / cell["plain"]["throughput_rps"], 3)
            cell["monitor_ratio"] = round(
                cell["ours"]["throughput_rps"] / cell["unmonitored"]["throughput_rps"], 3
            )
            rows.append(cell)
            o, q = cell["ours"], cell["plain"]
            print(
                f"batch {batch:3d} clients {clients}: ours p50 {o['p50_ms']} ms p99 {o['p99_ms']} ms "
                f"{o['throughput_rps']} req/s | plain p50 {q['p50_ms']} ms p99 {q['p99_ms']} ms "
                f"{q['throughput_rps']} req/s | ours/plain {cell['ratio']} | monitored/unmonitored "
                f"{cell['monitor_ratio']}" + ("" if o["ok"] == o["sent"] else f"  errors {o['statuses']}"),
                flush=True,
            )
            if args.binary:
                binary = cell["ours_binary"]
                cell["binary_ratio"] = round(binary["throughput_rps"] / cell["plain"]["throughput_rps"], 3)
                print(
                    f"batch {batch:3d} clients {clients}: ours, binary tensors: p50 {binary['p50_ms']} ms "
                    f"p99 {binary['p99_ms']} ms {binary['throughput_rps']} req/s | ours binary/plain "
                    f"{cell['binary_ratio']}",
                    flush=True,
                )
    return rows


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="cmim-predict-load-") as d:
        tmp = Path(d)
        url = f"sqlite:///{tmp / 'cmim.db'}"
        print("training the benchmark's model ...", flush=True)
        model, key, weights, config = train(tmp, url)
        unmonitored = unmonitored_copy(url, uuid.UUID(model))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CMIM_")} | {
            "OMP_NUM_THREADS": str(args.threads),
            "CMIM_DATABASE_URL": url,
            "CMIM_ARTIFACT_URL": f"file://{tmp / 'artifacts'}",
            "CMIM_CACHE_DIR": str(tmp / "cache"),
            "CMIM_PREDICT_MAX_BATCH": "1024",
            "CMIM_OWNER_QUERY_BUDGET": str(BIG),
            "CMIM_GLOBAL_QUERY_BUDGET": str(BIG),
            "BENCH_WEIGHTS": str(weights),
            "BENCH_CONFIG": str(config),
        }
        if args.redis:
            env |= {"CMIM_BROKER_URL": args.redis, "CMIM_REDIS_PREFIX": f"cmim-bench-{uuid.uuid4().hex[:8]}"}
        ports = free_port(), free_port()
        procs = [
            start(["app.main:create_app", "--factory"], env, tmp / "ours.log", ports[0]),
            start(
                ["predict_load:plain_app", "--factory", "--app-dir", "bench"],
                env,
                tmp / "plain.log",
                ports[1],
            ),
        ]
        try:
            rows = asyncio.run(matrix(args, (ports[0], model, key), ports[1], unmonitored))
        except SystemExit:
            for log in ("ours.log", "plain.log"):
                print(f"--- {log}\n{(tmp / log).read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=15)
            if args.redis:  # this run's counters only: the Redis may be shared
                import redis

                client = redis.Redis.from_url(args.redis)
                for name in client.scan_iter(f"{env['CMIM_REDIS_PREFIX']}:*"):
                    client.delete(name)
    cell = {(r["batch"], r["clients"]): r for r in rows}
    summary = {}
    if (1, 8) in cell:
        summary["batch1_clients8_ours_rps"] = cell[1, 8]["ours"]["throughput_rps"]
        summary["batch1_clients8_ratio"] = cell[1, 8]["ratio"]
        summary["batch1_clients8_monitor_ratio"] = cell[1, 8]["monitor_ratio"]
    if (1, 1) in cell:
        summary["batch1_clients1_ours_p50_ms"] = cell[1, 1]["ours"]["p50_ms"]
    print("summary:", json.dumps(summary))
    return {
        "benchmark": "predict_load",
        "limits": "redis" if args.redis else "in process",
        "requests": args.requests,
        "cpus": os.cpu_count(),
        "omp_threads": args.threads,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "cells": rows,
        "summary": summary,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="timed requests per route and cell")
    p.add_argument("--warmup", type=int, default=200, help="untimed requests per route and cell first")
    p.add_argument("--rounds", type=int, default=5, help="alternations between the two servers per cell")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="rows per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="connections in flight")
    p.add_argument(
        "--redis", default=None, help="Redis URL: our limits in Redis (deployed) instead of in process"
    )
    p.add_argument("--binary", action="store_true", help="also measure ours with binary tensor data")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both servers")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop a cell's sending after this long")
    args = p.parse_args(argv)
    if min(args.warmup, args.rounds, *args.batches, *args.clients) < 1 or args.requests < args.rounds:
        p.error(
            "--warmup, --rounds, --batches and --clients must be at least 1, --requests at least --rounds"
        )
    return args


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(main(parse())))
