"""Speed benchmarks: each ratio is measured against its baseline in the same run."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ml.models import build_model
from ml.objectives import StepContext, make_objective


def _step_timer(objective_name: str, batch: int, seed: int = 0) -> Callable[[int], float]:
    """A closure that runs n full training steps (forward, loss, backward, AdamW) and returns seconds."""
    torch.manual_seed(seed)
    model = build_model("cnn1d", (1, 40), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = make_objective(objective_name)
    x, y = torch.randn(batch, 1, 40), torch.arange(batch) % 10
    ctx = StepContext(epoch=1.0, epochs=60, num_classes=10)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = sum(objective(model(x), y, ctx).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    return run


def cmim_step_ratio(steps: int = 60, rounds: int = 5, batch: int = 128) -> dict[str, float]:
    """CMIM (default grid, in-batch centroids) step time / CE step time, the benchmark teacher."""
    ce, cmim = _step_timer("ce", batch), _step_timer("cmim", batch)
    ce(10), cmim(10)  # warm-up
    ratios, ce_times, cmim_times = [], [], []
    for r in range(rounds):  # alternate the order so drift hits both sides
        a, b = (ce(steps), cmim(steps)) if r % 2 == 0 else tuple(reversed((cmim(steps), ce(steps))))
        ce_times.append(a / steps)
        cmim_times.append(b / steps)
        ratios.append(b / a)
    return {
        "ce_step_ms": 1000 * statistics.median(ce_times),
        "cmim_step_ms": 1000 * statistics.median(cmim_times),
        "cmim_step_ratio": statistics.median(ratios),
    }


def matmul_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """The machine's measured fp32 matmul FLOP/s (n x n, the current torch threads): the arithmetic bound."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return reps * 2 * n**3 / (time.perf_counter() - t0)


@dataclass
class PaperSeed:
    """One seed of the paper benchmark's audit, with untrained teachers (speed only): fresh runs and
    oracles per call, so the same lockstep can be trained again."""

    plan: Any  # ml.audit.AuditPlan
    student: str

    def runs(self, phase: int | None = None) -> list[Any]:
        """The unlimited phase's 56 students, or a budget phase's attackers."""
        from ml.audit import Run

        p = self.plan
        if phase is not None:
            return p.attack_runs(p.budget_teachers)
        ls = [Run(name, self.student, eps=e, mixup=m) for name, e, m in p.ls_recipes]
        return ls + p.attack_runs(list(p.teachers))

    def oracles(self) -> dict[str, Any]:
        return {t: box.oracle(0, torch.device("cpu")) for t, box in self.plan.teachers.items()}

    def train(
        self, epochs: int, phase: int | None = None, on_epoch: Callable[[int, int], None] | None = None
    ):
        """Train one phase for `epochs` epochs of the unlimited schedule; returns its runs."""
        from ml.audit import train_lockstep

        runs, cfg = self.runs(phase), self.plan.cfg.model_copy(update={"epochs": epochs})
        train_lockstep(runs, self.plan.data, self.oracles(), cfg, 0, on_epoch=on_epoch, budget=phase)
        return runs


def phase_name(phase: int | None) -> str:
    """A phase's name in the speed benchmarks: "unlimited", or "budget_B" for a budget of B queries."""
    return "unlimited" if phase is None else f"budget_{phase}"


def paper_seed() -> PaperSeed:
    """Seed 0 of the `mnist1d` paper benchmark: its data, attacks, LS rows, its black boxes (untrained
    CMIM and CE teachers served as the benchmark serves them) and its budget black boxes."""
    from ml.audit import AuditConfig, plan, serve_box
    from ml.benchmark import BENCHMARKS
    from ml.data import load_dataset
    from ml.evidence import Secret
    from ml.oracle import OutputMode

    bench = BENCHMARKS.get("mnist1d")
    data = load_dataset(bench.dataset, **bench.dataset_params)
    torch.manual_seed(0)
    cnn = [
        build_model(bench.teacher, data.input_shape, data.num_classes, mean=data.mean, std=data.std)
        for _ in "ab"
    ]
    cfg = AuditConfig(
        students=[bench.student], attacks=bench.attacks, attack_params=bench.attack_params, seeds=1,
        epochs=bench.epochs, ls_eps=bench.ls_eps, query_budgets=bench.query_budgets,
        output_mode=OutputMode(), device="cpu",
    )  # fmt: skip
    secret = Secret.benchmark(cfg.base_seed)  # as `cmim bench paper` serves its keyed black boxes
    boxes = {
        n: serve_box([cnn[p.objective == "ce"]], p.output_mode, p.policy, data, secret)
        for n, p in bench.protections.items()
    }
    p = plan(cfg, cnn[0], data, control=cnn[1], protections=boxes, budget_for=bench.budget_for)
    return PaperSeed(p, bench.student)


def audit_throughput(epochs: int = 4, log: Callable[..., Any] = print) -> dict[str, float]:
    """Student epochs per second of one seed of the paper benchmark (all 56 students, unlimited phase),
    and their fraction of the arithmetic bound: measured matmul FLOP/s / FLOPs per student epoch.

    Epoch 1 warms up, epoch 2 is counted (torch's FLOP counter: student training and test evaluation,
    the teachers' answers), the later epochs are timed. Teachers are untrained (speed only).
    """
    from torch.utils.flop_counter import FlopCounterMode

    seed = paper_seed()
    counter = FlopCounterMode(display=False)
    stamps: list[float] = []

    def on_epoch(epoch: int, total: int) -> None:
        if epoch == 1:
            counter.__enter__()
        elif epoch == 2:
            counter.__exit__(None, None, None)
        stamps.append(time.perf_counter())

    runs = seed.train(max(epochs, 3), on_epoch=on_epoch)
    flops_per_student_epoch = counter.get_total_flops() / len(runs)
    epoch_s = (
        statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:], strict=False))
        if len(stamps) > 3
        else stamps[-1] - stamps[-2]
    )
    bound = matmul_flops()
    rate = len(runs) / epoch_s
    out = {
        "audit_students": len(runs),
        "student_epochs_per_s": rate,
        "gflop_per_student_epoch": flops_per_student_epoch / 1e9,
        "matmul_gflops": bound / 1e9,
        "bound_student_epochs_per_s": bound / flops_per_student_epoch,
        "fraction_of_bound": rate * flops_per_student_epoch / bound,
    }
    log(
        f"audit throughput ({len(runs)} {seed.student} students of one paper seed, "
        f"{torch.get_num_threads()} threads): {rate:.2f} student epochs/s; "
        f"{out['gflop_per_student_epoch']:.3f} GFLOP per student epoch, "
        f"matmul {out['matmul_gflops']:.1f} GFLOP/s -> bound {out['bound_student_epochs_per_s']:.2f} student "
        f"epochs/s, fraction {out['fraction_of_bound']:.2f}"
    )
    return out


class _Counted(Exception):
    """Raised by the epoch callback once the epochs to count have been counted."""


def phase_flops(train: Callable[[Callable[[int, int], None]], Any]) -> float:
    """FLOPs of one lockstep phase, `train(on_epoch)`: counted by torch's FLOP counter up to the end of
    its first epoch (set-up and cached answers included), plus its second epoch times the epochs left.

    Exact when every epoch after the first does the same arithmetic (the same steps, an evaluation
    each: `eval_every` 1, as in the paper benchmark); the phase is stopped after its second epoch.
    What runs after the last epoch (fidelity, evidence) is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    marks: list[tuple[int, int]] = []

    def on_epoch(epoch: int, epochs: int) -> None:
        marks.append((counter.get_total_flops(), epochs))
        if epoch == 2:
            raise _Counted

    with counter:
        try:
            train(on_epoch)
        except _Counted:
            pass
    (first, epochs), *rest = marks
    return float(first + (epochs - 1) * (rest[0][0] - first) if rest else first)


def paper_floor(workers: int = 2, log: Callable[..., Any] = print) -> dict[str, Any]:
    """The arithmetic floor of `cmim bench paper --workers W` (the mnist1d benchmark) on this machine.

    Its FLOPs, counted by torch's FLOP counter: one seed's unlimited and budget phases (`phase_flops`)
    times the seeds, and one epoch of each teacher recipe times its epochs and seeds; at the measured
    fp32 matmul rate of one thread, W threads at once (W at most the cores). No run of the same
    arithmetic in fp32 can take less time: the floor leaves out everything but matmuls and
    convolutions (data, element-wise ops, optimiser, monitor simulation) and assumes no contention.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ml.benchmark import BENCHMARKS, teacher_configs
    from ml.train import train_model

    bench = BENCHMARKS.get("mnist1d")
    seed = paper_seed()
    phases: dict[str, float] = {}
    for phase in [None, *bench.query_budgets]:
        name = phase_name(phase)
        phases[name] = phase_flops(lambda cb, p=phase: seed.train(bench.epochs, p, on_epoch=cb))
        log(f"{name}: {phases[name] / 1e12:.2f} TFLOP per seed")
    per_epoch: dict[str, float] = {}  # one epoch of each recipe: the same arithmetic every epoch
    teachers, configs = 0.0, teacher_configs(bench, "cpu")
    for key, _, cfg, _ in configs:
        if key not in per_epoch:
            counter = FlopCounterMode(display=False)
            with counter:
                train_model(cfg.model_copy(update={"epochs": 1}), seed.plan.dataset)
            per_epoch[key] = float(counter.get_total_flops())
        teachers += per_epoch[key] * cfg.epochs
    log(f"teachers: {teachers / 1e12:.2f} TFLOP ({len(configs)} teachers)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = matmul_flops()
    finally:
        torch.set_num_threads(threads)
    lanes = max(1, min(workers, os.cpu_count() or 1))
    total = bench.seeds * sum(phases.values()) + teachers
    floor = total / (peak * lanes)
    log(
        f"{bench.seeds} seeds: {total / 1e12:.1f} TFLOP; matmul {peak / 1e9:.1f} GFLOP/s per thread "
        f"x {lanes} -> floor {floor:.0f} s ({floor / 60:.1f} min)"
    )
    return {
        "seeds": bench.seeds,
        "phase_tflop_per_seed": {k: v / 1e12 for k, v in phases.items()},
        "teachers_tflop": teachers / 1e12,
        "total_tflop": total / 1e12,
        "matmul_gflops_per_thread": peak / 1e9,
        "lanes": lanes,
        "floor_s": floor,
    }


def speed(
    steps: int = 60, rounds: int = 5, students: int = 8, log: Callable[..., Any] = print
) -> dict[str, Any]:
    """Every speed ratio of `cmim bench speed`."""
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    result.update(cmim_step_ratio(steps, rounds))
    log(
        f"CE step {result['ce_step_ms']:.2f} ms, CMIM step {result['cmim_step_ms']:.2f} ms "
        f"(cnn1d, batch 128, 7 temperatures): ratio {result['cmim_step_ratio']:.3f}"
    )
    try:
        from ml.audit import lockstep_ratio
    except ImportError:
        return result
    result.update(lockstep_ratio(students=students, log=log))
    result.update(audit_throughput(log=log))
    return result
