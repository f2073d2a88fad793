"""The audit as a plan of independent, deterministic tasks: one per seed and budget phase, and one per
seed for the evidence null's independent models of other architectures.

`plan(cfg, teacher, data, ...)` resolves everything the tasks share (the served black boxes, the
attacker's data, the rows); `run(task)` trains one phase of one seed and returns its typed records
(`ml.audit.records`); `plan.summary` measures the served models once (`ml.audit.summary`) and
`ml.audit.report.assemble(summary, results)` turns the results into the report. A task's key hashes
the plan and the task, so a result stored under it is never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel
from torch import Tensor, nn

from ml.attacks import ATTACKS
from ml.audit.blackbox import BlackBox, as_models, serve_box, serving_summary, teacher_summary
from ml.audit.config import NULL_FIELDS, REPORT_VERSION, AuditConfig, ls_recipes
from ml.audit.lockstep import train_lockstep
from ml.audit.nulls import train_nulls
from ml.audit.records import EvidenceRecord, StudentRecord, TaskResult
from ml.audit.result import DatasetInfo, ServedSummary
from ml.audit.students import Run
from ml.audit.summary import PlanSummary, TaskRef, describe_task
from ml.cmi import model_logits
from ml.data import Dataset, load_dataset
from ml.evidence.audit import Challenges, build_challenges, evidence_records, keyed_costs
from ml.evidence.nulls import SKLEARN_NULLS, default_null_families
from ml.evidence.secret import Secret
from ml.policy import FittedPolicy, PolicyConfig
from ml.train import keep_freed_memory, resolve_device

Tick = Callable[[int, str], None]  # (epochs done in this task, message)


@dataclass
class AuditPlan:
    """Everything the tasks of one audit share; picklable, so a spawned worker can run its tasks."""

    cfg: AuditConfig  # query budgets resolved: the report states them
    dataset: Dataset  # as given: the teachers' summaries are measured on it
    data: Dataset  # the attacker's share of the train split
    teachers: dict[str, BlackBox]  # "teacher", "teacher_raw", "control" and the named protections
    protections: list[str]
    budget_teachers: list[str]
    attack_rows: list[tuple[str, str, BaseModel]]
    ls_recipes: list[tuple[str, float, bool]]  # (row name, eps, mixup) of every LS student
    transfer: Tensor | None
    fingerprint: str = ""
    secret: Secret | None = field(default=None, repr=False)  # the evidence secret (keyed answers, challenges)
    challenges: Challenges = field(default_factory=dict, repr=False)
    no_unlimited: list[str] = field(default_factory=list)  # black boxes attacked under the budgets only

    @property
    def has_nulls(self) -> bool:
        """Whether the audit trains independent models of other architectures (evidence measured, families
        named)."""
        return bool(self.challenges and self.cfg.null_archs)

    @property
    def tasks(self) -> list[AuditTask]:
        """(seed index, phase) tasks: phase None trains the LS students and the unlimited attackers,
        phase B the attackers holding B cached answers, and (`nulls`) the null's independent models of
        other architectures; every task is independent of the others."""
        phases = [None, *(self.cfg.query_budgets or [])]
        out = []
        for s in range(self.cfg.seeds):
            out += [AuditTask(s, p, self) for p in phases]
            out += [AuditTask(s, None, self, nulls=True)] if self.has_nulls else []
        return out

    def task_epochs(self, phase: int | None, nulls: bool = False) -> int:
        """A task's progress total, in epochs of the unlimited schedule."""
        if nulls:
            zoo = [f for f in self.cfg.null_archs or [] if f not in SKLEARN_NULLS]
            return self.cfg.epochs * self.cfg.null_models if zoo else 1
        if phase is None:
            return self.cfg.epochs
        return self.cfg.epochs * len({len(ATTACKS.get(k).views) for _, k, _ in self.attack_rows})

    @property
    def total_epochs(self) -> int:
        return sum(t.epochs for t in self.tasks)

    @cached_property
    def summary(self) -> PlanSummary:
        """What the report needs of the models, measured once (`ml.audit.summary`)."""
        return summarise_plan(self)

    @property
    def served_policy(self) -> FittedPolicy | None:
        """The serving policy fitted to the (single) audited teacher, exactly as the audit served it;
        None when it is served without one (or one teacher per seed was audited)."""
        policies = self.teachers["teacher"].policies
        return policies[0] if policies and len(policies) == 1 else None

    def attack_runs(self, teacher_keys: list[str]) -> list[Run]:
        return [
            Run(name, arch, teacher=t, attack=ATTACKS.get(key)(self.data.num_classes, params))
            for arch in self.cfg.students
            for t in teacher_keys
            for name, key, params in self.attack_rows
        ]


@dataclass(frozen=True)
class AuditTask:
    """One phase of one seed of a plan."""

    seed_index: int
    phase: int | None
    plan: AuditPlan = field(compare=False, repr=False)
    nulls: bool = False  # the null's independent models of other architectures (phase None)

    @property
    def index(self) -> int:
        """The task's position in its plan's task list."""
        return self.plan.tasks.index(self)

    @property
    def epochs(self) -> int:
        return self.plan.task_epochs(self.phase, self.nulls)

    @property
    def key(self) -> str:
        """The name its result is stored under: the plan's fingerprint and the task (for the null's task,
        what the null is: the plan's fingerprint leaves it out, so a changed null trains only the null)."""
        if self.nulls:
            what = json.dumps([self.plan.cfg.null_archs, self.plan.cfg.null_models]).encode()
            null = hashlib.sha256(what).hexdigest()[:12]
            return f"{self.plan.fingerprint[:32]}-s{self.seed_index}-nulls-{null}"
        phase = "full" if self.phase is None else str(self.phase)
        return f"{self.plan.fingerprint[:32]}-s{self.seed_index}-{phase}"

    def describe(self) -> str:
        return describe_task(self.seed_index, self.plan.cfg.seeds, self.phase, self.nulls)


class ResultStore(Protocol):
    """Where finished task results are kept: a task whose result is there is not run again."""

    def load(self, key: str) -> TaskResult | None: ...

    def save(self, key: str, result: TaskResult) -> None: ...


class DirectoryResults:
    """Task results as JSON files in a directory (the CLI's and the tests' store)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self, key: str) -> TaskResult | None:
        f = self.path / f"{key}.json"
        return TaskResult.model_validate(json.loads(f.read_text())) if f.exists() else None

    def save(self, key: str, result: TaskResult) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{key}.tmp"
        tmp.write_text(json.dumps(result.to_json()))
        tmp.replace(self.path / f"{key}.json")  # atomic: a reader never sees half a result


def plan(
    cfg: AuditConfig,
    teacher: nn.Module | Sequence[nn.Module],
    dataset: Dataset,
    *,
    control: nn.Module | Sequence[nn.Module] | None = None,
    protections: dict[str, BlackBox] | None = None,
    budget_for: Sequence[str] | None = None,
    secret: Secret | None = None,
    evidence: bool = True,
    no_unlimited: Sequence[str] = (),
) -> AuditPlan:
    """The audit of `teacher` as it will be served, as independent tasks.

    `teacher` and `control` may be one model or one per seed (seed i attacks model i); `protections`
    adds further black boxes attacked in the same lockstep, against the same LS students; `budget_for`
    names the black boxes attacked under the query budgets (default: all). `secret` draws keyed
    answers and the evidence challenges (default: the benchmarks' reproducible one); `evidence=False`
    builds no challenges (a teacher that runs elsewhere is asked nothing for them). `no_unlimited` names
    the black boxes not attacked in the unlimited phase (a deployed model whose query cap cannot pay for it).
    """
    secret = secret or Secret.benchmark(cfg.base_seed)
    if cfg.control and control is None:
        raise ValueError("the audit asks for a CE control (control=true) but no control teacher was given")
    data = (
        dataset.subset_train(cfg.labelled_fraction, cfg.base_seed) if cfg.labelled_fraction < 1 else dataset
    )
    cfg = cfg.model_copy(update={"query_budgets": cfg.budgets(len(data.x_train))})  # the report states them
    if cfg.null_archs is None:  # the evidence null's other architectures, stated as run
        cfg = cfg.model_copy(update={"null_archs": default_null_families(cfg.students, dataset.input_shape)})
    transfer = None
    if cfg.transfer is not None:
        pool = load_dataset(cfg.transfer, **cfg.transfer_params)
        if tuple(pool.input_shape) != tuple(dataset.input_shape):
            raise ValueError(
                f"transfer set {cfg.transfer!r} has inputs {pool.input_shape}; "
                f"the audit's data has {dataset.input_shape}"
            )
        transfer = pool.x_train[: cfg.transfer_size]
    teachers = {"teacher": serve_box(as_models(teacher), cfg.output_mode, cfg.policy, dataset, secret)}
    if cfg.compare_raw and (cfg.output_mode.kind != "probs" or cfg.policy != PolicyConfig()):
        teachers["teacher_raw"] = BlackBox(as_models(teacher))
    if cfg.control:
        assert control is not None
        teachers["control"] = serve_box(as_models(control), cfg.output_mode, cfg.policy, dataset, secret)
    for name, box in (protections or {}).items():
        if name in teachers:
            raise ValueError(f"protection name {name!r} is reserved")
        teachers[name] = box
    budget_teachers = [t for t in (teachers if budget_for is None else budget_for) if t != "teacher_raw"]
    unknown = sorted(set(budget_teachers) - set(teachers))
    if unknown:
        raise ValueError(f"budget_for names no audited black box: {', '.join(unknown)}")
    if not budget_teachers:  # the report states the budgets that were run
        cfg = cfg.model_copy(update={"query_budgets": []})
    challenges = build_challenges(teachers, dataset, secret, cfg.seeds) if evidence else {}
    out = AuditPlan(
        cfg, dataset, data, teachers, list(protections or {}), budget_teachers, cfg.attack_rows(),
        ls_recipes(cfg), transfer, secret=secret, challenges=challenges, no_unlimited=list(no_unlimited),
    )  # fmt: skip
    out.fingerprint = _fingerprint(out)
    return out


def _fingerprint(p: AuditPlan, measured: bool = True) -> str:
    """A hash of everything a task's result depends on: config, data, served models, policies, transfer.

    With `measured=False` (`identity`), only what the plan was given, not what it measured from that in
    float32 (the models' answers, the fitted policies, the challenges), which rounds apart on another
    kind of CPU or thread count."""
    h = hashlib.sha256(f"report v{REPORT_VERSION}".encode())
    h.update(p.cfg.model_dump_json(exclude=NULL_FIELDS).encode())  # the null's task keys them (AuditTask.key)
    h.update(json.dumps([p.dataset.fingerprint, p.data.fingerprint, len(p.data.x_train)]).encode())
    h.update(json.dumps(p.budget_teachers).encode())
    if p.no_unlimited:  # only when set: the fingerprints of ordinary plans are unchanged
        h.update(json.dumps({"no_unlimited": p.no_unlimited}).encode())
    probe = p.dataset.x_test[:64]
    for name, box in p.teachers.items():
        h.update(f"{name}:{box.mode.model_dump_json()}".encode())
        for m in box.models:
            h.update(type(m).__name__.encode())
            for k, t in m.state_dict().items():
                h.update(k.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            if measured:  # a black box without weights (an ONNX model) is told apart by its answers
                h.update(model_logits(m, probe).round(decimals=4).numpy().tobytes())
        for fitted in box.policies or []:
            h.update(fitted.config.model_dump_json().encode())
            for k, t in sorted(fitted.to_tensors().items()) if measured else ():
                h.update(k.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    if p.transfer is not None:
        h.update(p.transfer.detach().cpu().contiguous().numpy().tobytes())
    for mech, per_box in p.challenges.items() if measured else ():  # the evidence each task measures
        for box, per_seed in per_box.items():
            h.update(f"evidence {mech} {box}".encode())
            for ch in per_seed:
                h.update(ch.x.numpy().tobytes() + ch.labels.numpy().tobytes())
    return h.hexdigest()


def identity(p: AuditPlan) -> str:
    """The plan's fingerprint over what it was given only (config, data, weights, policy configs,
    transfer): the same on every machine for the same code, where `AuditPlan.fingerprint` is not."""
    return _fingerprint(p, measured=False)


def run(task: AuditTask, *, results: ResultStore | None = None, tick: Tick | None = None) -> TaskResult:
    """Train one phase of one seed (with a budget: one cached lockstep per view count); deterministic.

    Returns the task's records (`StudentRecord`, one per student, and their evidence agreements); a
    result already in `results` is returned as it is. `tick(done, message)` gets the
    task's progress in epochs of the unlimited schedule.
    """
    if results is not None:
        stored = results.load(task.key)
        if stored is not None:
            if tick is not None:
                tick(task.epochs, f"{task.describe()}: stored result")
            return stored
    keep_freed_memory()
    t0 = time.perf_counter()
    p, s, phase = task.plan, task.seed_index, task.phase
    cfg, data, done = p.cfg, p.data, 0
    seed, device = cfg.base_seed + s, resolve_device(cfg.device)
    # one attacker = one API key: a fresh oracle (query history) per phase
    oracles = {t: box.oracle(s, device) for t, box in p.teachers.items()}
    records: list[StudentRecord] = []
    evidence: list[dict[str, Any]] = []  # every student's agreement on every challenge (ml.evidence.audit)

    def record(runs: list[Run], n_queries: Callable[[Run], int]) -> None:
        records.extend(
            StudentRecord(
                phase=phase, teacher=r.teacher, arch=r.arch, row=r.name, best=max(r.acc), last=r.acc[-1],
                fidelity=r.fidelity, queries=n_queries(r),
            )
            for r in runs
        )  # fmt: skip

    def ticker(message: str) -> Callable[[int, int], None]:
        def on_epoch(epoch: int, epochs: int) -> None:
            if tick is not None:
                tick(done + round(epoch * cfg.epochs / epochs), f"{message}, epoch {epoch}/{epochs}")

        return on_epoch

    if task.nulls:  # the null's other architectures (ml.audit.nulls), one lockstep per copy

        def on_copy_epoch(k: int, epoch: int, epochs: int) -> None:
            if tick is not None:
                what = f"{task.describe()}, model {k + 1}/{cfg.null_models}, epoch {epoch}/{epochs}"
                tick(k * cfg.epochs + round(epoch * cfg.epochs / epochs), what)

        nulls, predict = train_nulls(cfg.null_archs or [], data, cfg, seed, on_epoch=on_copy_epoch)
        evidence += evidence_records(nulls, predict, p.challenges, s, phase)
        record(nulls, lambda r: 0)
    elif phase is None:
        runs = [Run(name, arch, eps=e, mixup=m) for arch in cfg.students for name, e, m in p.ls_recipes]
        runs += p.attack_runs([t for t in p.teachers if t not in p.no_unlimited])
        predict = train_lockstep(
            runs, data, oracles, cfg, seed, on_epoch=ticker(task.describe()), transfer=p.transfer
        )
        evidence += evidence_records(runs, predict, p.challenges, s, phase)
        record(runs, lambda r: cfg.epochs * len(data.x_train) * len(r.views) if r.teacher else 0)
    else:
        pending = p.attack_runs(p.budget_teachers)
        # every attack spends exactly B queries: attacks with as many views share one cached set
        for n_views in dict.fromkeys(len(r.views) for r in pending):
            group = [r for r in pending if len(r.views) == n_views]
            on_epoch = ticker(f"{task.describe()}, {n_views}-view attacks")
            predict = train_lockstep(
                group, data, oracles, cfg, seed, on_epoch=on_epoch, budget=phase, transfer=p.transfer
            )
            evidence += evidence_records(group, predict, p.challenges, s, phase)
            record(group, lambda r: phase // len(r.views) * len(r.views))
            done += cfg.epochs
    # the seconds it took tell the report how long a longer audit would take on this worker
    seconds = time.perf_counter() - t0
    result = TaskResult(
        key=task.key,
        seed_index=s,
        phase=phase,
        nulls=task.nulls,
        records=records,
        seconds=seconds,
        evidence=[EvidenceRecord.model_validate(e) for e in evidence],
    )
    if results is not None:
        results.save(task.key, result)
    return result


def summarise_plan(p: AuditPlan) -> PlanSummary:
    """The plan's summary: its served black boxes measured once (boxes serving one model share it)."""
    dataset = p.dataset
    measured: dict[tuple[int, ...], dict[str, Any]] = {}

    def served(name: str) -> ServedSummary:
        box = p.teachers[name]
        key = tuple(id(m) for m in box.models)
        if key not in measured:
            measured[key] = teacher_summary(box.models, dataset)
        return ServedSummary.model_validate({**measured[key], "serving": serving_summary(box, dataset)})

    names = ["teacher", *(["control"] if p.cfg.control else []), *p.protections]
    evidence = p.secret is not None and bool(p.challenges)
    return PlanSummary(
        fingerprint=p.fingerprint,
        cfg=p.cfg,
        dataset=DatasetInfo(
            name=dataset.name,
            fingerprint=dataset.fingerprint,
            n_train=len(dataset.x_train),
            n_test=len(dataset.x_test),
        ),
        labelled_samples=len(p.data.x_train),
        transfer_samples=None if p.transfer is None else len(p.transfer),
        served={name: served(name) for name in names},
        compares_raw="teacher_raw" in p.teachers,
        protections=p.protections,
        budget_teachers=p.budget_teachers,
        ls_names=[name for name, _, _ in p.ls_recipes],
        attack_names=[name for name, _, _ in p.attack_rows],
        tasks=[
            TaskRef(seed_index=t.seed_index, phase=t.phase, nulls=t.nulls, key=t.key, epochs=t.epochs)
            for t in p.tasks
        ],  # fmt: skip
        commitment=p.secret.commitment() if evidence and p.secret is not None else None,
        keyed_costs=keyed_costs(p.teachers, dataset) if evidence else {},
    )
