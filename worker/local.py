"""The embedded worker of `cmim serve`: the SQLite jobs table is the queue; same `run_job` as Celery."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from multiprocessing.synchronize import Event

from sqlalchemy import select, update

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.models import RUNNING, Job, utcnow
from app.core.outage import is_outage
from app.core.queue import next_claimable_job
from app.core.sweep import sweep

log = logging.getLogger(__name__)
LOCAL_PREFIX = "local"


def local_worker_id() -> str:
    return f"{LOCAL_PREFIX}:{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_orphans(settings: Settings) -> int:
    """Expire the leases of jobs held by dead local workers on this host, so they resume now, not later."""
    prefix = f"{LOCAL_PREFIX}:{socket.gethostname()}:"
    with session_scope(settings.database_url) as s:
        held = s.execute(
            select(Job.id, Job.worker_id).where(
                Job.status.in_([r.value for r in RUNNING]), Job.worker_id.like(f"{prefix}%")
            )
        ).all()
        dead = [job_id for job_id, wid in held if not _alive(int(wid.rsplit(":", 1)[1]))]
        if dead:
            s.execute(update(Job).where(Job.id.in_(dead)).values(lease_expires_at=utcnow()))
    return len(dead)


def run_local_worker(stop: Event | threading.Event | None = None, settings: Settings | None = None) -> None:
    """Claim and run jobs until stop is set (or the parent process is gone)."""
    from worker.pipeline import run_job  # torch is imported here, in the worker process

    settings = settings or get_settings()
    stop = stop or threading.Event()
    if not logging.getLogger().handlers:  # a spawned process starts without the parent's logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    worker_id = local_worker_id()
    released = release_orphans(settings)
    if released:
        log.info("resuming %d job(s) left by a stopped local worker", released)
    sweep_due = 0.0
    while not stop.is_set() and os.getppid() == parent:
        try:
            now = utcnow().timestamp()
            if now >= sweep_due:
                with session_scope(settings.database_url) as s:
                    sweep(s, broker=False)
                sweep_due = now + settings.sweep_seconds
            with session_scope(settings.database_url) as s:
                job_id = next_claimable_job(s)
            if job_id is not None:
                log.info("job %s: %s", job_id, run_job(job_id, settings, worker_id))
                continue
        except Exception as e:
            if not is_outage(e):
                raise
            # The table is the queue: nothing is lost while the database is away; ask again later.
            log.warning("database unreachable (%s: %s); polling on", type(e).__name__, e)
        stop.wait(settings.poll_seconds)


def _run_embedded(stop: Event) -> None:
    """The spawned worker's entry: Ctrl-C in the terminal is the server's to handle (it stops the worker
    through `stop`), so the worker is not interrupted, and not taken for crashed, by the same signal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_local_worker(stop)


def start_local_worker() -> tuple[mp.process.BaseProcess, Event]:
    """The embedded worker in a fresh (spawned) process, so training never blocks the API's event loop."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_run_embedded, args=(stop,), name="cmim-local-worker", daemon=True)
    proc.start()
    return proc, stop


class SupervisedWorker:
    """The embedded worker, started again whenever its process ends other than by `close` (a crash, an
    out-of-memory kill, a signal): the new one releases the jobs the dead one held (`release_orphans`) and
    resumes them from their checkpoints, without restarting `cmim serve`. A worker that keeps dying at
    once is started again after a growing pause (1 s, doubling, at most a minute)."""

    SETTLED_SECONDS = 60.0  # a worker that lived this long died of something else: the pause starts over

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.proc, self._stop = start_local_worker()
        self._started = time.monotonic()
        threading.Thread(target=self._watch, name="cmim-worker-supervisor", daemon=True).start()

    def _watch(self) -> None:
        pause = 1.0
        while not self._closing.is_set():
            self.proc.join(timeout=0.5)
            if self.proc.is_alive() or self._closing.is_set():
                continue
            lived = time.monotonic() - self._started
            pause = 1.0 if lived >= self.SETTLED_SECONDS else pause
            log.warning(
                "the embedded worker ended (exit code %s) after %.0f s; starting another in %.0f s, which "
                "resumes its jobs",
                self.proc.exitcode, lived, pause,
            )  # fmt: skip
            if self._closing.wait(pause):
                return
            pause = min(2 * pause, 60.0)
            with self._lock:
                if self._closing.is_set():
                    return
                self.proc, self._stop = start_local_worker()
                self._started = time.monotonic()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (it finishes nothing more: a running job resumes at the next start)."""
        with self._lock:
            self._closing.set()
        self._stop.set()
        self.proc.join(timeout=timeout)
        if self.proc.is_alive():
            self.proc.terminate()
