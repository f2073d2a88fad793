"""Event streams against a real uvicorn on PostgreSQL: 200 open streams hold no database connection while
they wait, the API keeps answering, and each key may hold only so many streams (429 beyond)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from service_helpers import assert_problem, job_body
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from test_e2e import Stack, base_env, submit

from app.core.db import session_scope
from app.core.keys import create_api_key, find_api_key
from app.core.migrate import upgrade

STREAMS, PER_KEY = 200, 20


@pytest.fixture(scope="module")
def api(pg_databases, tmp_path_factory) -> Iterator[Stack]:
    """The API alone (no worker: a submitted job stays queued, so its stream waits forever)."""
    tmp = tmp_path_factory.mktemp("streams")
    url = pg_databases.create()
    upgrade(url)
    stack = Stack(base_env(tmp, CMIM_DATABASE_URL=url, CMIM_MAX_STREAMS_PER_KEY=str(PER_KEY)), tmp)
    stack.key = new_key(url)
    proc = stack.start("api", "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(stack.port))
    try:
        stack.wait_healthy(proc)
        yield stack
    finally:
        stack.close()


def new_key(url: str, same_owner_as: str | None = None) -> str:
    """A new key: of a new owner, or of the owner of the key same_owner_as."""
    with session_scope(url) as s:
        owner = find_api_key(s, same_owner_as).owner_id if same_owner_as else None
        return create_api_key(s, owner_id=owner)[1]


def connections(url: str) -> int:
    """Server connections to this test's database (only the API's pool uses it)."""
    engine = create_engine(make_url(url).set(database="postgres"), poolclass=NullPool)
    with engine.connect() as conn:
        q = text("SELECT numbackends FROM pg_stat_database WHERE datname = :d")
        return int(conn.scalar(q, {"d": make_url(url).database}))


async def open_stream(client: httpx.AsyncClient, path: str, key: str, opened: asyncio.Event) -> int:
    """Open one SSE stream, signal once its first line arrived, and read until cancelled."""
    async with client.stream("GET", path, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            opened.set()
            return r.status_code
        async for _ in r.aiter_lines():
            opened.set()
    return 200


async def timed(client: httpx.AsyncClient, path: str, headers: dict[str, str], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = await client.get(path, headers=headers)
        assert r.status_code == 200, r.text
        times.append(time.perf_counter() - t)
    return sorted(times)


def test_200_open_streams_hold_no_connection_and_the_api_answers(api: Stack) -> None:
    url = api.env["CMIM_DATABASE_URL"]
    job_id = submit(api, job_body())
    keys = [new_key(url, api.key) for _ in range(STREAMS // PER_KEY)]
    path = f"/api/v1/jobs/{job_id}/events"

    async def scenario() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=STREAMS + 20)
        async with httpx.AsyncClient(base_url=api.base, timeout=30, limits=limits) as client:
            opened = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [
                asyncio.create_task(open_stream(client, path, keys[i % len(keys)], opened[i]))
                for i in range(STREAMS)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 120)
            await asyncio.sleep(2)  # several poll ticks with every stream waiting
            held = connections(url)
            health = await timed(client, "/healthz", {}, 30)
            me = await timed(client, "/api/v1/keys/me", api.headers, 30)
            over = await client.get(path, headers={"Authorization": f"Bearer {keys[0]}"})
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return {"held": held, "health": health, "me": me, "over": over, "done": tasks}

    out = asyncio.run(scenario())
    assert all(not t.done() or t.cancelled() for t in out["done"])  # every stream stayed open until closed
    # The pool holds at most 15 connections; with a connection per stream it would need 200.
    assert out["held"] <= 16, out["held"]
    print(
        f"\n{STREAMS} open streams: {out['held']} database connections; p99 healthz "
        f"{out['health'][-1] * 1000:.0f} ms, keys/me {out['me'][-1] * 1000:.0f} ms (max of 30)"
    )
    assert out["health"][-1] < 5 and out["me"][-1] < 5  # answered, not starved (the bench has the p99)
    body = assert_problem(out["over"], 429)
    assert "streams" in body["detail"] and out["over"].headers["retry-after"]


def test_a_closed_stream_frees_its_slot(api: Stack) -> None:
    job_id = submit(api, job_body())
    key = new_key(api.env["CMIM_DATABASE_URL"], api.key)
    path = f"/api/v1/jobs/{job_id}/events"

    async def scenario() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=api.base, timeout=30) as client:
            opened = [asyncio.Event() for _ in range(PER_KEY)]
            tasks = [asyncio.create_task(open_stream(client, path, key, e)) for e in opened]
            await asyncio.gather(*(e.wait() for e in opened))
            full = (await client.get(path, headers={"Authorization": f"Bearer {key}"})).status_code
            tasks[0].cancel()
            await asyncio.gather(tasks[0], return_exceptions=True)
            # The server notices the disconnect at its next poll and frees the slot: ask until it has.
            status, deadline = 429, time.monotonic() + 30
            while status == 429 and time.monotonic() < deadline:
                async with client.stream("GET", path, headers={"Authorization": f"Bearer {key}"}) as r:
                    status = r.status_code
                await asyncio.sleep(0.1 if status == 429 else 0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return full, status

    assert asyncio.run(scenario()) == (429, 200)
