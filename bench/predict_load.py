"""Load benchmark of the predict endpoints of a running `cmim serve`, on loopback only.

Sends a bounded number of requests (`--requests`, default 2000) at a fixed concurrency
(`--concurrency`, default 8) to `POST /api/v1/models/{id}/predict` and/or `POST /v2/models/{id}/infer`,
each carrying `--batch` rows shaped as `GET /v2/models/{id}` says, and prints p50/p90/p99 latency,
throughput and errors per route, then one JSON line. It stops by itself: after the requests are sent,
or at `--max-seconds`, whichever comes first.

Every row counts against the key's query budget and every request against its rate limit, so a load
test with an ordinary key measures 429s, not serving. `--fresh-key` uses `--key` (which needs the
`keys:admin` scope) to make a predict-only key with no query budget and a rate limit of `--rate-limit`
requests per minute, and runs with that. Run the client on the server's machine: on a small box it
competes with the server for CPU, so report the load average beside the numbers (the JSON has it).

    python bench/predict_load.py --key $KEY --model $JOB_ID --fresh-key --concurrency 8 --batch 1
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

import httpx
import numpy as np

PATHS = {"predict": "/api/v1/models/{model}/predict", "infer": "/v2/models/{model}/infer"}
ROUTES = tuple(PATHS)


def loopback(url: str) -> str:
    """The URL without a trailing slash; exits unless its host is a loopback address."""
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"refusing to load {url!r}: only loopback hosts (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(math.ceil(q / 100 * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def bodies(route: str, input_shape: list[int], batch: int, seed: int) -> bytes:
    """One request body (JSON bytes, encoded once) with `batch` rows of seeded Gaussian inputs."""
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape)).astype(np.float32)
    if route == "predict":
        return json.dumps({"inputs": x.tolist()}).encode()
    return json.dumps(
        {
            "id": "bench",
            "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
            ],
        }
    ).encode()


async def run_route(
    client: httpx.AsyncClient, path: str, body: bytes, requests: int, concurrency: int, deadline: float
) -> dict:
    """Send `requests` POSTs of `body` to `path` from `concurrency` workers; latencies of the 2xx ones."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    next_index = 0
    headers = {"Content-Type": "application/json"}

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests and time.monotonic() < deadline:
            next_index += 1
            t = time.perf_counter()
            try:
                r = await client.post(path, content=body, headers=headers)
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            dt = time.perf_counter() - t
            statuses[status] += 1
            if status.startswith("2"):
                latencies.append(dt)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    latencies.sort()
    sent = sum(statuses.values())
    ok = len(latencies)
    return {
        "sent": sent,
        "ok": ok,
        "errors": sent - ok,
        "statuses": dict(statuses),
        "stopped_early": sent < requests,
        "wall_s": round(wall, 3),
        "throughput_rps": round(ok / wall, 1) if wall > 0 else None,
        "rows_per_s": None,
        "p50_ms": ms(percentile(latencies, 50)),
        "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(latencies[-1] if latencies else None),
        "mean_ms": ms(sum(latencies) / ok if ok else None),
    }


async def main(args: argparse.Namespace) -> dict:
    base = loopback(args.url)
    key = args.key or os.environ.get("CMIM_KEY")
    if not key:
        sys.exit("--key (or CMIM_KEY) is required")
    timeout = httpx.Timeout(args.timeout)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits, trust_env=False) as client:
        key_info: dict = {"fresh": False}
        if args.fresh_key:
            r = await client.post(
                "/api/v1/keys",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "name": "predict load benchmark",
                    "scopes": ["models:predict"],
                    "query_budget": None,
                    "rate_limit_per_minute": args.rate_limit,
                },
            )
            if r.status_code != 201:
                sys.exit(f"could not create a fresh key: {r.status_code} {r.text}")
            key = r.json()["key"]
            key_info = {"fresh": True, "query_budget": None, "rate_limit_per_minute": args.rate_limit}
        client.headers["Authorization"] = f"Bearer {key}"

        r = await client.get(f"/v2/models/{args.model}")
        if r.status_code != 200:
            sys.exit(f"GET /v2/models/{args.model}: {r.status_code} {r.text}")
        meta = r.json()
        input_shape = meta["inputs"][0]["shape"][1:]
        budget = meta["parameters"]["query_budget"]
        routes = ROUTES if args.route == "both" else (args.route,)
        rows_needed = len(routes) * (args.requests + args.warmup) * args.batch
        print(
            f"model {args.model}: input {input_shape}, budget {budget['limit']} ({budget['applies']}), "
            f"{budget['remaining']} left; this run sends {rows_needed} rows",
            flush=True,
        )
        if budget["remaining"] is not None and budget["remaining"] < rows_needed:
            print("warning: the query budget will run out (429s); use --fresh-key", file=sys.stderr)

        results: dict[str, dict] = {}
        deadline = time.monotonic() + args.max_seconds
        for route in routes:
            path = PATHS[route].format(model=args.model)
            body = bodies(route, input_shape, args.batch, args.seed)
            warm = await client.post(path, content=body, headers={"Content-Type": "application/json"})
            if warm.status_code != 200:
                sys.exit(f"POST {path}: {warm.status_code} {warm.text[:500]}")
            rate = int(warm.headers.get("X-RateLimit-Limit", "0") or 0)
            if rate and rate < args.requests + args.warmup:
                print(f"warning: rate limit {rate}/min, 429s ahead (--fresh-key)", file=sys.stderr)
            await run_route(client, path, body, args.warmup - 1, args.concurrency, deadline)
            load = os.getloadavg()
            res = await run_route(client, path, body, args.requests, args.concurrency, deadline)
            if res["throughput_rps"] is not None:
                res["rows_per_s"] = round(res["throughput_rps"] * args.batch, 1)
            res["request_bytes"] = len(body)
            res["loadavg_before"] = [round(v, 2) for v in load]
            res["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
            results[route] = res
            print(
                f"{route:8s} c={args.concurrency} batch={args.batch}: {res['ok']}/{res['sent']} ok, "
                f"p50 {res['p50_ms']} ms, p90 {res['p90_ms']} ms, p99 {res['p99_ms']} ms, "
                f"{res['throughput_rps']} req/s ({res['rows_per_s']} rows/s), errors {res['errors']} "
                f"{res['statuses'] if res['errors'] else ''}  load {res['loadavg_before'][0]}",
                flush=True,
            )
    return {
        "benchmark": "predict_load",
        "url": base,
        "model": args.model,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "batch": args.batch,
        "key": key_info,
        "cpus": os.cpu_count(),
        "routes": results,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--key", default=None, help="API key (default: $CMIM_KEY)")
    p.add_argument("--model", required=True, help="model id (the job id)")
    p.add_argument("--requests", type=int, default=2000, help="timed requests per route")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--batch", type=int, default=1, help="rows per request")
    p.add_argument("--route", choices=[*ROUTES, "both"], default="both")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests per route first")
    p.add_argument(
        "--fresh-key", action="store_true", help="make a predict-only key, no budget (needs keys:admin)"
    )
    p.add_argument("--rate-limit", type=int, default=1_000_000, help="the fresh key's requests per minute")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long in all")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = p.parse_args(argv)
    if min(args.requests, args.concurrency, args.batch, args.warmup) < 1:
        p.error("--requests, --concurrency, --batch and --warmup must be at least 1")
    return args


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse()))))
