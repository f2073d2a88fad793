"""A job's events: reading them, and the server-sent event stream with its per-process poller."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.core.models import Job, JobEvent, JobStatus
from app.problems import Problem
from app.services.schemas import EventOut

MAX_EVENT_ID = 2**31 - 1  # event ids are 32-bit integers in the database


def event_out(event: JobEvent) -> EventOut:
    return EventOut(id=event.seq, kind=event.kind, data=event.data, created_at=event.created_at)


def events_after(session: Session, job_id: uuid.UUID, after: int, limit: int = 1000) -> list[JobEvent]:
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after).order_by(JobEvent.seq)
    return list(session.scalars(q.limit(limit)))


def _poll(sessions: sessionmaker[Session], job_id: uuid.UUID, after: int) -> tuple[list[EventOut], bool]:
    with sessions() as s:
        events = [event_out(e) for e in events_after(s, job_id, after)]
        status = JobStatus(s.scalar(select(Job.status).where(Job.id == job_id)))
    return events, status.terminal


def sse_frame(event: EventOut) -> str:
    data = event.model_dump_json(include={"data", "created_at"})
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


class EventWatch:
    """One poller per API process for every open event stream, and the per-key cap on open streams.

    A waiting stream holds no database connection: every `poll_seconds` one short query reads the
    newest event id and status of all watched jobs, and wakes the streams that have news; each stream
    then reads its events with a session of its own, closed at once.
    """

    def __init__(self, sessions: sessionmaker[Session], poll_seconds: float, max_per_key: int) -> None:
        self.sessions, self.poll_seconds, self.max_per_key = sessions, poll_seconds, max_per_key
        self._waiters: dict[uuid.UUID, list[tuple[int, asyncio.Event]]] = {}
        self._heads: dict[uuid.UUID, tuple[int, bool]] = {}  # job -> (last event id, finished)
        self._open: Counter[uuid.UUID] = Counter()
        self._task: asyncio.Task[None] | None = None

    def open(self, key_id: uuid.UUID) -> None:
        """Count one more stream for this key; 429 over the cap."""
        if self._open[key_id] >= self.max_per_key:
            raise Problem(
                429,
                f"this API key has {self._open[key_id]} event streams open, the most allowed; close one "
                "or poll with ?after=N",
                slug="too-many-streams",
                headers={"Retry-After": "5"},
            )
        self._open[key_id] += 1

    def close(self, key_id: uuid.UUID) -> None:
        self._open[key_id] -= 1
        if self._open[key_id] <= 0:
            del self._open[key_id]

    def open_streams(self) -> int:
        return sum(self._open.values())

    async def wait(self, job_id: uuid.UUID, after: int, timeout: float) -> bool:
        """True once the job has an event after `after` or has finished; False after timeout seconds."""
        seq, finished = self._heads.get(job_id, (0, False))
        if seq > after or finished:
            return True
        ready = asyncio.Event()
        entry = (after, ready)
        self._waiters.setdefault(job_id, []).append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(ready.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiting = self._waiters.get(job_id, [])
            if entry in waiting:
                waiting.remove(entry)
            if not waiting:
                self._waiters.pop(job_id, None)
                self._heads.pop(job_id, None)

    def _read_heads(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[int, bool]]:
        with self.sessions() as s:
            rows = s.execute(select(Job.id, Job.last_event_seq, Job.status).where(Job.id.in_(ids))).all()
        return {i: (seq, JobStatus(status).terminal) for i, seq, status in rows}

    async def _run(self) -> None:
        while self._waiters:
            try:
                heads = await run_in_threadpool(self._read_heads, list(self._waiters))
            except Exception:  # noqa: BLE001 - an outage: streams keep waiting (and keep-alive) until it ends
                heads = {}
            self._heads.update(heads)
            for job_id, waiting in list(self._waiters.items()):
                seq, finished = heads.get(job_id, (0, job_id not in heads))
                for after, ready in waiting:
                    if seq > after or finished:
                        ready.set()
            await asyncio.sleep(self.poll_seconds)


async def sse_events(
    watch: EventWatch,
    key_id: uuid.UUID,
    job_id: uuid.UUID,
    after: int,
    is_disconnected: Callable[[], Any],
    heartbeat_seconds: float = 15.0,
) -> AsyncIterator[str]:
    """The job's events from `after` on as SSE frames; ends once the job is finished and all are sent.

    The caller has counted the stream with `watch.open(key_id)`; it is closed here, however it ends.
    """
    try:
        yield "retry: 2000\n\n"
        while not await is_disconnected():
            events, terminal = await run_in_threadpool(_poll, watch.sessions, job_id, after)
            for event in events:
                yield sse_frame(event)
                after = event.id
            if events:
                continue
            if terminal:
                return
            if not await watch.wait(job_id, after, heartbeat_seconds):
                yield ": keep-alive\n\n"  # keeps proxies from closing a quiet stream
    finally:
        watch.close(key_id)
