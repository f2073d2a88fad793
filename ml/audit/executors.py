"""Executors of an audit plan: in this process, or in a local pool of spawned processes.

Both run the same `run(task)` and hand its results to `assemble`; the report is the same whichever
runs it (the deployed service fans the same tasks out over Celery workers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ml.audit.blackbox import BlackBox
from ml.audit.config import AuditConfig, AuditProgress
from ml.audit.records import TaskResult
from ml.audit.report import assemble
from ml.audit.tasks import AuditPlan, AuditTask, ResultStore, plan, run
from ml.data import Dataset

OnProgress = Callable[[AuditProgress], None]


class ProgressTotals:
    """Per-task progress summed into one audit-wide AuditProgress."""

    def __init__(self, p: AuditPlan, on_progress: OnProgress | None) -> None:
        self.total, self.on_progress = p.total_epochs, on_progress
        self.done: dict[int, int] = {}

    def __call__(self, task: int, done: int, message: str) -> None:
        self.done[task] = done
        if self.on_progress is not None:
            total_done = sum(self.done.values())
            self.on_progress(AuditProgress(stage="audit", done=total_done, total=self.total, message=message))


def run_in_process(
    p: AuditPlan, *, on_progress: OnProgress | None = None, results: ResultStore | None = None
) -> list[TaskResult]:
    """Every task of the plan, one after another, in this process."""
    totals = ProgressTotals(p, on_progress)
    return [run(t, results=results, tick=lambda done, msg, i=t.index: totals(i, done, msg)) for t in p.tasks]


_WORKER_QUEUE: Any = None


def _worker_init(queue: Any, threads: int) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = queue
    torch.set_num_threads(threads)


def _worker_task(task: AuditTask, results: ResultStore | None) -> TaskResult:
    return run(task, results=results, tick=lambda done, msg: _WORKER_QUEUE.put((task.index, done, msg)))


def run_in_pool(
    p: AuditPlan,
    workers: int,
    *,
    on_progress: OnProgress | None = None,
    results: ResultStore | None = None,
) -> list[TaskResult]:
    """Every task of the plan in `workers` spawned processes, each with its share of the CPU threads."""
    tasks = p.tasks
    workers = min(workers, len(tasks))
    if workers <= 1:
        return run_in_process(p, on_progress=on_progress, results=results)
    import queue as queue_lib

    import torch.multiprocessing as mp

    totals = ProgressTotals(p, on_progress)
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    threads = max(1, torch.get_num_threads() // workers)
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(messages, threads))
    try:
        # the longest tasks (the unlimited phases, which also train the LS students) go first
        order = sorted(tasks, key=lambda t: t.phase is not None)
        pending = {t.index: pool.apply_async(_worker_task, (t, results)) for t in order}
        while not all(r.ready() for r in pending.values()):
            try:
                totals(*messages.get(timeout=0.5))  # a cancel raised here terminates the workers below
            except queue_lib.Empty:
                pass
        out = [pending[t.index].get() for t in tasks]  # re-raises a worker's exception here
    finally:
        pool.terminate()
        pool.join()
    while True:  # progress sent just before a worker finished
        try:
            totals(*messages.get_nowait())
        except queue_lib.Empty:
            break
    return out


def run_audit(
    cfg: AuditConfig,
    teacher: nn.Module | Sequence[nn.Module],
    dataset: Dataset,
    *,
    control: nn.Module | Sequence[nn.Module] | None = None,
    protections: dict[str, BlackBox] | None = None,
    budget_for: Sequence[str] | None = None,
    workers: int = 1,
    on_progress: OnProgress | None = None,
    results: ResultStore | None = None,
    named: Callable[[AuditPlan], str] | None = None,
) -> dict[str, Any]:
    """Audit a teacher as it will be served: plan, run (here, or in `workers` spawned processes: the
    same report) and assemble; returns the versioned JSON report (`AuditReport.to_json`).

    `teacher` and `control` may be one model or one per seed; `protections` adds further black boxes
    attacked against the same LS students (each its own section under report["protections"]);
    `budget_for` names the black boxes attacked under the query budgets (default: all); tasks whose
    result is in `results` are not run again; `named` gives the name the plan's tasks go by there (default:
    the plan's fingerprint; `ml.resume.Kept.fingerprint` names them alike on every machine).
    """
    t0 = time.perf_counter()
    p = plan(cfg, teacher, dataset, control=control, protections=protections, budget_for=budget_for)
    if named is not None:
        p.fingerprint = named(p)
    out = run_in_pool(p, workers, on_progress=on_progress, results=results)
    return assemble(p.summary, out, wall_s=time.perf_counter() - t0).to_json()
