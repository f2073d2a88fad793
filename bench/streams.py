"""Open event streams against the API's responsiveness: p50/p99 of `GET /healthz`, `GET /api/v1/keys/me`
and `POST /api/v1/models/{id}/predict` with no stream open (the baseline), then with `--streams` (200)
SSE streams open and waiting on a queued job, and the ratio; also the database connections held.

Self-contained and on loopback only: it creates its own PostgreSQL database (dropped at the end) on
`--pg` (the local server by default), trains a tiny model in-process so predict has something to
serve, starts uvicorn (no worker: the streamed job stays queued) and ends with one JSON line.

    python bench/streams.py --streams 200 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.core.config import Settings
from app.core.db import dispose_engines, session_scope
from app.core.keys import create_api_key, find_api_key
from app.core.migrate import upgrade
from app.services.jobs import create_job
from app.services.schemas import JobCreate
from worker.pipeline import run_job

TINY = {
    "teacher": {"dataset": "mnist1d", "dataset_params": {"num_train": 500, "num_test": 500}, "epochs": 2},
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


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(int(round(q / 100 * len(s) + 0.5)) - 1, 0)]


async def timed(client: httpx.AsyncClient, call: tuple, n: int, concurrency: int) -> dict[str, float]:
    """p50/p99/max (ms) of one call, n requests at the given concurrency; non-2xx answers are counted."""
    method, path, kw = call
    times: list[float] = []
    errors = 0
    left = n

    async def one() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            t = time.perf_counter()
            r = await client.request(method, path, **kw)
            times.append(time.perf_counter() - t)
            errors += r.status_code >= 300

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return {
        "p50_ms": round(percentile(times, 50) * 1000, 1),
        "p99_ms": round(percentile(times, 99) * 1000, 1),
        "max_ms": round(max(times) * 1000, 1),
        "errors": errors,
    }


async def measure(client: httpx.AsyncClient, calls: dict, n: int, concurrency: int) -> dict[str, dict]:
    return {name: await timed(client, call, n, concurrency) for name, call in calls.items()}


def held_connections(url: str) -> int:
    name = make_url(url).database
    engine = create_engine(make_url(url).set(database="postgres"))
    with engine.connect() as conn:
        n = conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": name})
    engine.dispose()
    return int(n)


async def run(args: argparse.Namespace, url: str, base: str, keys: list[str], model: str, job: str) -> dict:
    limits = httpx.Limits(max_connections=args.streams + 2 * args.concurrency)
    auth = {"Authorization": f"Bearer {keys[0]}"}
    x = [[0.0] * 40]  # one mnist1d input (1 x 40)
    calls = {
        "healthz": ("GET", "/healthz", {}),
        "keys_me": ("GET", "/api/v1/keys/me", {"headers": auth}),
        "predict": (
            "POST",
            f"/api/v1/models/{model}/predict",
            {"headers": auth, "json": {"inputs": [x]}},
        ),
    }
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, trust_env=False) as client:
        await measure(client, calls, 20, args.concurrency)  # warm-up (model load, pools)
        baseline = await measure(client, calls, args.requests, args.concurrency)
        opened = [asyncio.Event() for _ in range(args.streams)]

        async def stream(i: int) -> None:
            headers = {"Authorization": f"Bearer {keys[1 + i % (len(keys) - 1)]}"}
            async with client.stream("GET", f"/api/v1/jobs/{job}/events", headers=headers) as r:
                assert r.status_code == 200, r.status_code
                async for _ in r.aiter_lines():
                    opened[i].set()

        tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 120)
        await asyncio.sleep(2)
        held = held_connections(url)
        loaded = await measure(client, calls, args.requests, args.concurrency)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"baseline": baseline, "streams_open": loaded, "db_connections_with_streams_open": held}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--requests", type=int, default=200, help="requests per call and phase")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cmim-bench-streams-"))
    name = f"cmim_bench_{secrets.token_hex(4)}"
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(args.pg).set(database=name).render_as_string(hide_password=False)
    proc = None
    try:
        upgrade(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CMIM_")} | {
            "CMIM_DATABASE_URL": url,
            "CMIM_ARTIFACT_URL": f"file://{tmp / 'artifacts'}",
            "CMIM_WORK_DIR": str(tmp / "work"),
            "CMIM_CACHE_DIR": str(tmp / "cache"),
            "CMIM_RATE_LIMIT_PER_MINUTE": "1000000",
        }
        settings = Settings(
            database_url=url,
            artifact_url=env["CMIM_ARTIFACT_URL"],
            work_dir=env["CMIM_WORK_DIR"],
            cache_dir=env["CMIM_CACHE_DIR"],
        )
        per_key = settings.max_streams_per_key
        with session_scope(url) as s:
            rows = [create_api_key(s) for _ in range(1 + -(-args.streams // per_key))]
            owner = rows[0][0].owner_id
            keys = [rows[0][1]] + [create_api_key(s, owner_id=owner)[1] for _ in rows[1:]]
        jobs = []
        for _ in range(2):  # one to train and serve, one left queued for the streams to wait on
            with session_scope(url) as s:
                owner_key = find_api_key(s, keys[0])
                jobs.append(create_job(s, settings, owner_key, JobCreate.model_validate(TINY), None)[0])
        model, waiting = jobs
        assert run_job(model.id, settings) == "succeeded"
        dispose_engines()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                sys.exit(f"uvicorn exited with {proc.returncode}")
            time.sleep(0.2)
        load = os.getloadavg()
        result = asyncio.run(run(args, url, base, keys, str(model.id), str(waiting.id)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    for call in ("healthz", "keys_me", "predict"):
        b, s = result["baseline"][call], result["streams_open"][call]
        ratio = s["p99_ms"] / b["p99_ms"] if b["p99_ms"] else float("nan")
        print(
            f"{call:8s} p50 {b['p50_ms']:7.1f} -> {s['p50_ms']:7.1f} ms   p99 {b['p99_ms']:7.1f} -> "
            f"{s['p99_ms']:7.1f} ms ({ratio:.2f}x)   errors {b['errors']} -> {s['errors']}"
        )
    print(
        f"database connections with {args.streams} streams open: {result['db_connections_with_streams_open']}"
    )
    result |= {"benchmark": "streams", "streams": args.streams, "requests": args.requests, "loadavg": load}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
