"""Lockstep training of one seed: every student on the same shared batches, one optimiser step each."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ml.attacks import ATTACKS, AttackContext
from ml.audit.batches import Batch
from ml.audit.config import AuditConfig
from ml.audit.groups import ModuleGroup, StackedGroup, vmappable
from ml.audit.losses import StackedLoss
from ml.audit.sources import CachedSource, LiveSource
from ml.audit.students import Run, student_loss
from ml.cmi import model_logits
from ml.data import Dataset, load_dataset
from ml.models import build_model
from ml.oracle import Oracle
from ml.train import make_optimizer, make_schedule, resolve_device


def train_lockstep(
    runs: list[Run],
    data: Dataset,
    oracles: dict[str, Oracle],
    cfg: AuditConfig,
    seed: int,
    *,
    on_epoch: Callable[[int, int], None] | None = None,
    budget: int | None = None,
    transfer: Tensor | None = None,
    reshape: Callable[[Batch], Batch] | None = None,
) -> Callable[[Tensor], Tensor]:
    """Train every run of one seed on shared batches; fills each run's per-epoch accuracies and returns
    `predict(x)`: the trained runs' (runs, N) predicted labels, in run order.

    With a budget, the runs train on `budget // views` cached samples for as many optimiser steps as
    the unlimited schedule takes (cfg.epochs passes over the labelled data). `reshape` changes each
    batch's queries before they are sent (an attacker that knows the monitor).
    """
    device = resolve_device(cfg.device)
    source: LiveSource | CachedSource = LiveSource(runs, data, oracles, cfg, seed, transfer, reshape)
    if budget is not None:
        views = max(len(r.views) for r in runs)
        total_steps = cfg.epochs * source.steps_per_epoch
        source = CachedSource(source, max(budget // views, 1), seed)
        epochs = max(1, round(total_steps / source.steps_per_epoch))
        cfg = cfg.model_copy(update={"epochs": epochs, "eval_every": max(1, epochs // cfg.epochs)})
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    groups: list[StackedGroup | ModuleGroup] = []
    for arch in dict.fromkeys(r.arch for r in runs):
        torch.manual_seed(seed)  # same init for every student of this seed and architecture
        init = build_model(arch, data.input_shape, data.num_classes, mean=data.mean, std=data.std).to(device)
        members = [r for r in runs if r.arch == arch]
        groups.append((StackedGroup if vmappable(init, members) else ModuleGroup)(members, init))
    for r in runs:
        if r.attack is not None:
            r.attack.to(device)
    losses = [StackedLoss(g.runs, g.slots, device) if isinstance(g, StackedGroup) else None for g in groups]
    params = [p for g in groups for p in g.parameters()]
    params += [p for r in runs if r.attack is not None for p in r.attack.parameters()]
    opt = make_optimizer(params, cfg)
    sched = make_schedule(opt, cfg, source.steps_per_epoch)
    for epoch in range(cfg.epochs):
        ctx = AttackContext(epoch=epoch, epochs=cfg.epochs, num_classes=data.num_classes)
        for batch, served in source.epoch():
            loss = torch.zeros((), device=device)
            for g, stacked_loss in zip(groups, losses, strict=True):
                if stacked_loss is not None:  # a few loss calls for the whole group
                    loss = loss + stacked_loss(g.logits(batch), served, batch, ctx)
                    continue
                for run, out in zip(g.runs, g.forward(batch), strict=True):
                    loss = loss + student_loss(run, out, served, batch, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            for g in groups:
                accs = [100.0 * a for a in (g.predict(x_test) == y_test).float().mean(-1).tolist()]
                for run, acc in zip(g.runs, accs, strict=True):
                    run.acc.append(acc)
        if on_epoch is not None:
            on_epoch(epoch + 1, cfg.epochs)
    # fidelity: top-1 agreement with the teacher it attacked, on the test split
    by_model: dict[int, Tensor] = {}  # black boxes serving one model share its predictions
    for o in oracles.values():
        if id(o.model) not in by_model:
            by_model[id(o.model)] = model_logits(o.model, x_test).argmax(-1).to(device)
    teacher_pred = {t: by_model[id(o.model)] for t, o in oracles.items()}
    for g in groups:
        preds = g.predict(x_test)
        for run, p in zip(g.runs, preds, strict=True):
            if run.teacher is not None:
                run.fidelity = 100.0 * (p == teacher_pred[run.teacher]).float().mean().item()

    def predict(x: Tensor) -> Tensor:
        labels = {id(r): p for g in groups for r, p in zip(g.runs, g.predict(x.to(device)), strict=True)}
        return torch.stack([labels[id(r)] for r in runs]).cpu()

    return predict


# Two student mixes: attacks that all query the student's own view (one shared teacher query per
# batch), and a mix with fm and mlkd, whose extra views (mixup, strong) cost extra teacher queries.
LOCKSTEP_MIXES = {
    "plain_view": ["kd", "hard_label", "topk", "dkd", "nkd", "dist", "avg", "wttm"],
    "mixed_views": ["kd", "hard_label", "topk", "nkd", "dist", "avg", "fm", "mlkd"],
}


def lockstep_ratio(students: int = 8, epochs: int = 3, log: Callable[..., Any] = print) -> dict[str, float]:
    """Wall time of `students` MLP knockoffs trained in lockstep / the same trained one after another."""
    data = load_dataset("mnist1d", num_train=2000, num_test=1000)
    torch.manual_seed(0)
    teacher = build_model("cnn1d", data.input_shape, data.num_classes).eval()
    cfg = AuditConfig(epochs=epochs, seeds=1, control=False, attacks=["kd"], device="cpu")
    oracle = {"teacher": Oracle(teacher)}
    warm = cfg.model_copy(update={"epochs": 1})  # first calls pay one-off costs (vmap set-up, allocator)

    def timed(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    out: dict[str, float] = {}
    for mix, keys in LOCKSTEP_MIXES.items():
        keys = (keys * (students // len(keys) + 1))[:students]

        def make_runs(keys: list[str] = keys) -> list[Run]:
            return [
                Run(f"{k}{i}", "mlp", teacher="teacher", attack=ATTACKS.get(k)(10, None))
                for i, k in enumerate(keys)
            ]

        train_lockstep(make_runs(), data, oracle, warm, 0)
        train_lockstep(make_runs()[:1], data, oracle, warm, 0)
        lock = timed(lambda mk=make_runs: train_lockstep(mk(), data, oracle, cfg, 0))
        seq = timed(lambda mk=make_runs: [train_lockstep([r], data, oracle, cfg, 0) for r in mk()])
        log(
            f"{students} MLP students ({mix}: {', '.join(keys)}) x {epochs} epochs: "
            f"lockstep {lock:.2f} s, sequential {seq:.2f} s, ratio {lock / seq:.3f}"
        )
        suffix = "" if mix == "plain_view" else f"_{mix}"
        out |= {
            f"lockstep_s{suffix}": lock,
            f"sequential_s{suffix}": seq,
            f"lockstep_ratio{suffix}": lock / seq,
        }
    return out
