"""The undistillability audit: LS students against knockoff students, trained in lockstep.

Per seed, every student (each LS row and each attack row, against the teacher and the CE control)
sees the same shuffled, augmented batches; each input view (plain, mixup, strong) is built once per
batch and each teacher is queried once per view, so the teacher's cost is shared by all students
of that seed. All students of a seed and architecture start from the same initialisation (common
random numbers: differences between rows are then the method's, not the init's). Different seeds
keep their own data order and initialisation, so statistics over seeds stay honest. Students of the
same architecture without BatchNorm train as one batched computation (`torch.func` over stacked
parameters); others (BatchNorm nets, attacks that read intermediate features) run one module each
on the same shared batches.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ml.attacks import ATTACKS, Attack, AttackContext, build_params, rows
from ml.cmi import cmi_by_temperature, model_logits
from ml.data import DATASETS, Dataset, load_dataset
from ml.models import MODELS, build_model
from ml.oracle import Oracle, OutputMode
from ml.policy import FittedPolicy, PolicyConfig, fit_policy, honest_cost
from ml.train import (
    MAX_SEED,
    OptimConfig,
    TrainingCancelled,
    accuracy,
    batches,
    make_optimizer,
    make_schedule,
    resolve_device,
)

REPORT_VERSION = 1
# Label-only answers plus a per-key budget is the best protection our benchmark found: at 25 passes
# (100k queries) no knockoff of it beat the LS student (docs/calibration.md).
DEFAULT_BUDGET_PASSES = (1, 5, 25)
CMI_CURVE_TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

__all__ = ["AuditConfig", "AuditProgress", "run_audit", "TrainingCancelled", "lockstep_ratio"]


class AuditConfig(OptimConfig):
    """Students, attacks, seeds, schedule, LS sweep, control and the threat model of one audit."""

    model_config = ConfigDict(extra="forbid")

    students: list[str] = Field(default_factory=lambda: ["mlp"], min_length=1, max_length=8)
    attacks: list[str] = Field(default_factory=lambda: list(ATTACKS.names()), min_length=1, max_length=32)
    attack_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        max_length=32,
        description="per attack key: parameter overrides (replace its default sweep)",
    )
    seeds: int = Field(5, ge=1, le=100)
    base_seed: int = Field(0, ge=0, le=MAX_SEED)
    epochs: int = Field(300, ge=1, le=100_000)
    ls_eps: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3], min_length=1, max_length=16
    )
    ls_mixup: bool = Field(True, description="also sweep LS students trained on mixup")
    control: bool = Field(True, description="audit a CE teacher of the same architecture the same way")
    control_arch: str | None = Field(
        None,
        description="zoo architecture of the CE control; null: the teacher's own (an ONNX teacher has none: "
        "name one, or the audit runs without a control and its verdict cannot be `undistillable`)",
    )
    # Label-only is the best protection our benchmark found (docs/calibration.md): against a CMIM teacher
    # it takes function matching from +3.7 to +0.1 points over the LS student at no accuracy cost.
    output_mode: OutputMode = Field(
        default_factory=lambda: OutputMode(kind="label"),
        description="how the teacher is served (and attacked): probs, topk, label or rounded",
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="serving policy (snapping, off-manifold detector, action)"
    )
    compare_raw: bool = Field(False, description="also attack the raw probabilities (when served otherwise)")
    labelled_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the train split the attacker holds"
    )
    transfer: str | None = Field(
        None,
        description="a registered data set of the same input shape whose train inputs the attacker "
        "also queries, unlabelled (e.g. more mnist1d samples from another generator seed)",
    )
    transfer_params: dict[str, Any] = Field(default_factory=dict, max_length=32)
    transfer_size: int | None = Field(
        None, ge=1, le=10_000_000, description="use at most this many transfer inputs"
    )
    augment: bool = True
    mixup_alpha: float = Field(1.0, gt=0, le=100)
    edge_range: tuple[float, float] = Field(
        (0.7, 1.0), description="the mixup_edge view (fm_edge): mixing ratios drawn uniformly from this range"
    )
    noise_scale: float = Field(
        0.5,
        gt=0,
        le=100,
        description="the noise view (fm_noise): Gaussian noise std, in units of the data's std",
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the one-sided Welch test")
    eval_every: int = Field(1, ge=1, le=100_000)
    query_budgets: list[Annotated[int, Field(ge=1, le=1_000_000_000)]] | None = Field(
        None,
        max_length=16,
        description="also attack with only this many cached queries each: a budget curve, whose safe "
        "budget becomes the served model's per-key query budget. None (the default): 1, 5 and 25 passes "
        "over the attacker's labelled set (4k, 20k and 100k on the benchmark); [] for none",
    )
    device: str = "auto"

    @field_validator("students", "attacks", "transfer", "control_arch")
    @classmethod
    def _registered(cls, v: list[str] | str | None, info: ValidationInfo) -> list[str] | str | None:
        """Every name must be registered; an unknown one raises with the valid choices."""
        registries = {"students": MODELS, "attacks": ATTACKS, "transfer": DATASETS, "control_arch": MODELS}
        registry = registries[info.field_name]
        for name in [v] if isinstance(v, str) else v or []:
            registry.get(name)
        return v

    @field_validator("edge_range")
    @classmethod
    def _edge(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1] <= 1:
            raise ValueError("edge_range must be (low, high) with 0 <= low <= high <= 1")
        return v

    @field_validator("ls_eps")
    @classmethod
    def _eps(cls, v: list[float]) -> list[float]:
        if any(not 0 <= e < 1 for e in v):
            raise ValueError("label smoothing eps must lie in [0, 1)")
        return v

    def budgets(self, labelled: int) -> list[int]:
        """The query budgets for an attacker holding `labelled` labelled samples."""
        if self.query_budgets is None:
            return [labelled * passes for passes in DEFAULT_BUDGET_PASSES]
        return self.query_budgets

    def attack_rows(self) -> list[tuple[str, str, BaseModel]]:
        """(row name, attack key, params) for every requested attack, its default sweep unless overridden."""
        out = []
        for key in self.attacks:
            if key in self.attack_params:
                out.append((key, key, build_params(key, **self.attack_params[key])))
            else:
                out.extend((name, key, params) for name, params in rows(key))
        if self.transfer and "hard_label" not in self.attacks:  # part of the baseline with a transfer set
            out.extend(("hard_label", "hard_label", params) for _, params in rows("hard_label"))
        return out


class AuditProgress(BaseModel):
    stage: str
    done: int
    total: int
    message: str = ""


# ---------------------------------------------------------------- one student run


@dataclass
class Run:
    """One student: an LS row (attack None) or an attack row against one teacher."""

    name: str
    arch: str
    teacher: str | None = None  # key into the oracles; None for LS students
    attack: Attack | None = None
    eps: float = 0.0
    mixup: bool = False
    acc: list[float] = field(default_factory=list)  # test accuracy at each evaluated epoch
    fidelity: float = float("nan")

    @property
    def views(self) -> tuple[str, ...]:
        if self.attack is None:
            return ("mixup",) if self.mixup else ("plain",)
        return self.attack.views


def _loss(
    run: Run, out: dict[str, Tensor], served: dict[str, dict[str, Tensor]], batch: Batch, ctx: AttackContext
) -> Tensor:
    if run.attack is None:  # LS students learn from the labelled rows only (they come first)
        n, y = batch.labelled, batch.y[: batch.labelled]
        if run.mixup:  # mixup CE: lam CE(y) + (1 - lam) CE(y[perm]), per-sample lam
            z, (perm, lam) = out["mixup"][:n], (t[:n] for t in batch.mix["mixup"])
            ce_a = F.cross_entropy(z, y, label_smoothing=run.eps, reduction="none")
            ce_b = F.cross_entropy(z, y[perm], label_smoothing=run.eps, reduction="none")
            return (lam * ce_a + (1 - lam) * ce_b).mean()
        return F.cross_entropy(out["plain"][:n], y, label_smoothing=run.eps)
    answers = served[run.teacher]
    targets = batch.y
    if batch.labelled < len(targets):  # unlabelled transfer rows: the attacker's best label is the answer's
        guess = answers.get("plain", next(iter(answers.values()))).argmax(-1)
        targets = torch.where(targets >= 0, targets, guess)
    return sum(run.attack(out, answers, targets, ctx).values())


@dataclass
class Batch:
    y: Tensor  # -1 on unlabelled transfer rows, which come after the `labelled` labelled ones
    views: dict[str, Tensor]
    mix: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # mixed view -> (partner, ratio)
    labelled: int = -1

    def __post_init__(self) -> None:
        if self.labelled < 0:
            self.labelled = len(self.y)


# Every input view a student or attack can ask for, each drawn from its own generator (seeded per seed).
VIEWS = ("plain", "mixup", "strong", "mixup_edge", "noise")


def _view_generators(seed: int) -> dict[str, torch.Generator]:
    # the first three keep their seeds of earlier revisions, so their numbers reproduce
    seeds = [seed * 3 + i if i < 3 else 2**21 * i + seed for i in range(len(VIEWS))]
    return {v: torch.Generator().manual_seed(n) for v, n in zip(VIEWS, seeds, strict=True)}


def _make_batch(
    data: Dataset, x: Tensor, y: Tensor, needed: set[str], cfg: AuditConfig, gens: dict[str, torch.Generator]
) -> Batch:
    """The batch's views; each extra view draws from its own generator, so the plain batches of a
    seed do not depend on which other views the students need."""
    plain = data.augment(x, gens["plain"]) if cfg.augment else x
    batch = Batch(y=y, views={"plain": plain}, labelled=int((y >= 0).sum()))
    n, nl, shape = len(x), batch.labelled, (len(x),) + (1,) * (x.dim() - 1)
    for view in ("mixup", "mixup_edge"):  # a mix of two augmented inputs, a ratio per sample
        if view not in needed:
            continue
        g = gens[view]
        # labelled rows mix with labelled rows (LS-mixup needs both labels), transfer rows with transfer rows
        perm = torch.cat([torch.randperm(nl, generator=g), nl + torch.randperm(n - nl, generator=g)])
        if view == "mixup_edge":  # close to one real input: ratio ~ U(edge_range)
            low, high = cfg.edge_range
            lam = low + (high - low) * torch.rand(n, generator=g)
        elif cfg.mixup_alpha == 1:  # ratio ~ Beta(alpha, alpha)
            lam = torch.rand(n, generator=g)
        else:  # the Beta sampler takes no generator: it draws from the global RNG, seeded per seed
            lam = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample((n,))
        perm, lam = perm.to(x.device), lam.to(x.device)
        batch.mix[view] = (perm, lam)
        batch.views[view] = lam.view(shape) * plain + (1 - lam.view(shape)) * plain[perm]
    if "noise" in needed:  # a real input plus Gaussian noise of noise_scale data stds
        std = torch.tensor(data.std, dtype=x.dtype).view((1, -1) + (1,) * (x.dim() - 2)).to(x.device)
        noise = torch.randn(plain.shape, generator=gens["noise"]).to(x.device)
        batch.views["noise"] = plain + cfg.noise_scale * std * noise
    if "strong" in needed:  # a second, stronger view: augmentation twice plus extra noise
        g = gens["strong"]
        strong = data.augment(data.augment(x, g), g) if cfg.augment else x
        batch.views["strong"] = strong + 0.1 * torch.randn(strong.shape, generator=g).to(x.device)
    return batch


# ---------------------------------------------------------------- student groups


def _vmappable(model: nn.Module, runs: list[Run]) -> bool:
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return not has_bn and not any(r.attack is not None and r.attack.needs_features for r in runs)


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


class StackedGroup:
    """Students of one architecture trained as one batched computation over stacked parameters."""

    def __init__(self, runs: list[Run], init: nn.Module) -> None:
        self.runs = runs
        copies = [copy.deepcopy(init) for _ in runs]
        self.params, self.buffers = stack_module_state(copies)
        self.base = copy.deepcopy(init).to("meta")
        self.slots = [(i, v) for i, r in enumerate(runs) for v in r.views]  # one forward per (run, view)
        self.slot_index = torch.tensor([i for i, _ in self.slots], device=next(init.parameters()).device)

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def _fwd(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, batch: Batch) -> list[dict[str, Tensor]]:
        p, b = self.params, self.buffers
        if len(self.slots) > len(self.runs):  # some run needs several views: repeat its weights per slot
            p = {k: v[self.slot_index] for k, v in p.items()}
            b = {k: v[self.slot_index] for k, v in b.items()}
        views = {v for _, v in self.slots}
        if len(views) == 1:  # every slot sees the same input: broadcast it rather than copy it per student
            logits = vmap(self._fwd, in_dims=(0, 0, None))(p, b, batch.views[views.pop()])
        else:
            logits = vmap(self._fwd)(p, b, torch.stack([batch.views[v] for _, v in self.slots]))
        outs: list[dict[str, Tensor]] = [{} for _ in self.runs]
        for s, (i, v) in enumerate(self.slots):
            outs[i][v] = logits[s]
        return outs

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """(S, N) predicted labels of every student."""
        preds = []
        for i in range(0, len(x), 2048):
            chunk = x[i : i + 2048]
            logits = vmap(self._fwd, in_dims=(0, 0, None))(self.params, self.buffers, chunk)
            preds.append(logits.argmax(-1))
        return torch.cat(preds, dim=1)


class ModuleGroup:
    """Students that cannot be stacked (BatchNorm, feature hooks): one module each, same batches."""

    def __init__(self, runs: list[Run], init: nn.Module) -> None:
        self.runs = runs
        self.models = [copy.deepcopy(init) for _ in runs]
        self.features: list[Tensor | None] = [None] * len(runs)
        for i, (run, m) in enumerate(zip(runs, self.models, strict=True)):
            if run.attack is not None and run.attack.needs_features:
                last = _last_linear(m)
                run.attack.setup(last.in_features)
                last.register_forward_hook(self._hook(i))

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.features[i] = inputs[0]

        return hook

    def parameters(self) -> list[Tensor]:
        return [p for m in self.models for p in m.parameters()]

    def forward(self, batch: Batch) -> list[dict[str, Tensor]]:
        outs = []
        for i, (run, m) in enumerate(zip(self.runs, self.models, strict=True)):
            m.train()
            out = {v: m(batch.views[v]) for v in run.views if v != "plain"}
            out["plain"] = m(batch.views["plain"])  # last, so the hooked features are the plain view's
            if self.features[i] is not None:
                out["features"] = self.features[i]
            outs.append(out)
        return outs

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return torch.stack([model_logits(m, x).argmax(-1).to(x.device) for m in self.models])


# ---------------------------------------------------------------- lockstep training of one seed


class LiveSource:
    """Fresh augmented batches every epoch; every teacher queried once per needed view per batch."""

    def __init__(
        self,
        runs: list[Run],
        data: Dataset,
        oracles: dict[str, Oracle],
        cfg: AuditConfig,
        seed: int,
        transfer: Tensor | None = None,
    ) -> None:
        self.data, self.oracles, self.cfg = data, oracles, cfg
        self.transfer = transfer.to(resolve_device(cfg.device)) if transfer is not None else None
        self.transfer_gen = torch.Generator().manual_seed(seed * 3 + 2**20)
        self.transfer_order: list[Tensor] = []
        self.device = resolve_device(cfg.device)
        self.gens = _view_generators(seed)
        self.x, self.y = data.x_train.to(self.device), data.y_train.to(self.device)
        self.needed = {v for r in runs for v in r.views}
        self.queried = {t: {v for r in runs if r.teacher == t for v in r.views} for t in oracles}
        self.steps_per_epoch = math.ceil(len(self.x) / cfg.batch_size)

    def epoch(self) -> Iterator[tuple[Batch, dict[str, dict[str, Tensor]]]]:
        for idx in batches(len(self.x), self.cfg.batch_size, self.gens["plain"]):
            idx = idx.to(self.device)
            x, y = self.x[idx], self.y[idx]
            if self.transfer is not None:  # as many unlabelled transfer inputs as labelled ones
                t = self._transfer_batch(len(idx))
                x, y = torch.cat([x, t]), torch.cat([y, torch.full((len(t),), -1, device=y.device)])
            batch = _make_batch(self.data, x, y, self.needed, self.cfg, self.gens)
            # one forward per model and view, however many black boxes serve that model
            logits: dict[tuple[int, str], Tensor] = {}
            served = {t: {v: self._ask(t, v, batch, logits) for v in vs} for t, vs in self.queried.items()}
            yield batch, served

    def _transfer_batch(self, n: int) -> Tensor:
        """The next n transfer inputs, cycling through the pool in a fresh order each pass."""
        taken: list[Tensor] = []
        while sum(len(t) for t in taken) < n:
            if not self.transfer_order:
                order = torch.randperm(len(self.transfer), generator=self.transfer_gen)
                self.transfer_order = list(order.split(n))
            taken.append(self.transfer_order.pop(0))
        return self.transfer[torch.cat(taken)[:n].to(self.transfer.device)]

    def _ask(self, teacher: str, view: str, batch: Batch, logits: dict[tuple[int, str], Tensor]) -> Tensor:
        """The served answers; a refused query falls back to what the attacker knows itself: its own
        label (the mixed label on a mixup view), the same target the LS students train on."""
        oracle = self.oracles[teacher]
        key = (id(oracle.model), view)
        if key not in logits:
            with torch.no_grad():
                logits[key] = oracle.model.eval()(batch.views[view])
        answer = oracle(batch.views[view], logits[key])
        if oracle.last is None or not bool(oracle.last.refused.any()):
            return answer
        # a refused unlabelled transfer row leaves the attacker nothing: a uniform target
        own = F.one_hot(batch.y.clamp_min(0), answer.shape[-1]).to(answer.dtype)
        own = torch.where(batch.y[:, None] >= 0, own, torch.full_like(own, 1 / answer.shape[-1]))
        if view in batch.mix:
            perm, lam = batch.mix[view]
            lam = lam[:, None].to(answer.dtype)
            own = lam * own + (1 - lam) * own[perm]
        return torch.where(oracle.last.refused[:, None], own, answer)


class CachedSource:
    """An attacker with a query budget: n samples' answers bought once, then replayed as long as it likes."""

    def __init__(self, live: LiveSource, n: int, seed: int) -> None:
        parts: list[tuple[Batch, dict[str, dict[str, Tensor]]]] = []
        got = 0
        while got < n:
            for batch, served in live.epoch():
                parts.append((batch, served))
                got += len(batch.y)
                if got >= n:
                    break
        keep = lambda ts: torch.cat(ts)[:n]  # noqa: E731
        self.y = keep([b.y for b, _ in parts])
        self.views = {v: keep([b.views[v] for b, _ in parts]) for v in parts[0][0].views}
        self.served = {t: {v: keep([s[t][v] for _, s in parts]) for v in vs} for t, vs in parts[0][1].items()}
        self.n, self.batch_size = len(self.y), live.cfg.batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)

    def epoch(self) -> Iterator[tuple[Batch, dict[str, dict[str, Tensor]]]]:
        for idx in batches(self.n, self.batch_size, self.gen):
            idx = idx.to(self.y.device)
            y = self.y[idx]
            batch = Batch(y=y, views={v: x[idx] for v, x in self.views.items()}, labelled=int((y >= 0).sum()))
            yield batch, {t: {v: a[idx] for v, a in vs.items()} for t, vs in self.served.items()}


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
) -> None:
    """Train every run of one seed on shared batches; fills each run's per-epoch accuracies.

    With a budget, the runs train on `budget // views` cached samples for as many optimiser steps as
    the unlimited schedule takes (cfg.epochs passes over the labelled data).
    """
    device = resolve_device(cfg.device)
    source: LiveSource | CachedSource = LiveSource(runs, data, oracles, cfg, seed, transfer)
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
        groups.append((StackedGroup if _vmappable(init, members) else ModuleGroup)(members, init))
    for r in runs:
        if r.attack is not None:
            r.attack.to(device)
    params = [p for g in groups for p in g.parameters()]
    params += [p for r in runs if r.attack is not None for p in r.attack.parameters()]
    opt = make_optimizer(params, cfg)
    sched = make_schedule(opt, cfg, source.steps_per_epoch)
    for epoch in range(cfg.epochs):
        ctx = AttackContext(epoch=epoch, epochs=cfg.epochs, num_classes=data.num_classes)
        for batch, served in source.epoch():
            loss = torch.zeros((), device=device)
            for g in groups:
                for run, out in zip(g.runs, g.forward(batch), strict=True):
                    loss = loss + _loss(run, out, served, batch, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            for g in groups:
                for run, p in zip(g.runs, g.predict(x_test), strict=True):
                    run.acc.append(100.0 * (p == y_test).float().mean().item())
        if on_epoch is not None:
            on_epoch(epoch + 1, cfg.epochs)
    # fidelity: top-1 agreement with the teacher it attacked, on the test split
    teacher_pred = {t: model_logits(o.model, x_test).argmax(-1).to(device) for t, o in oracles.items()}
    for g in groups:
        for run, p in zip(g.runs, g.predict(x_test), strict=True):
            if run.teacher is not None:
                run.fidelity = 100.0 * (p == teacher_pred[run.teacher]).float().mean().item()


# ---------------------------------------------------------------- statistics and verdicts


def summarise(values: list[float]) -> dict[str, Any]:
    """mean, std (ddof 1), standard error and the values."""
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if len(a) > 1 else float("nan")
    return {
        "mean": float(a.mean()),
        "std": std,
        "se": std / math.sqrt(len(a)) if len(a) > 1 else float("nan"),
        "values": a.tolist(),
    }


def welch_one_sided(a: list[float], b: list[float]) -> float:
    """p-value of H1: mean(a) > mean(b), Welch's unequal-variance t test; nan with < 2 samples."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff = float(np.mean(a) - np.mean(b))
    if va + vb == 0:
        return 0.0 if diff > 0 else 1.0
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va and vb else len(a) + len(b) - 2
    return float(stats.t.sf(t, df))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); nan stays nan."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    out, running = [float("nan")] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def _row_stats(
    acc_best: list[float], acc_last: list[float], fidelity: list[float], queries: int
) -> dict[str, Any]:
    row = {"acc_best": summarise(acc_best), "acc_last": summarise(acc_last), "queries": queries}
    if not all(math.isnan(f) for f in fidelity):
        row["fidelity"] = summarise(fidelity)
    return row


def judge(ls: dict[str, dict[str, Any]], attacks: dict[str, dict[str, Any]], alpha: float) -> dict[str, Any]:
    """Best LS row, per-attack margins and tests, and this student's verdict (SPEC.md's rule)."""
    best_ls = max(ls, key=lambda k: ls[k]["acc_best"]["mean"])
    ls_vals = ls[best_ls]["acc_best"]["values"]
    for row in attacks.values():
        vals = row["acc_best"]["values"]
        row["margin"] = row["acc_best"]["mean"] - ls[best_ls]["acc_best"]["mean"]
        row["margin_se"] = summarise([a - b for a, b in zip(vals, ls_vals, strict=True)])["se"]
        row["p_value"] = welch_one_sided(vals, ls_vals)
        row["significant"] = bool(row["p_value"] < alpha)
    # the verdict tests the best of many attacks: Holm's adjustment says what survives the multiplicity
    for row, p in zip(attacks.values(), holm([r["p_value"] for r in attacks.values()]), strict=True):
        row["p_holm"] = p
        row["significant_holm"] = bool(p < alpha)
    best_attack = max(attacks, key=lambda k: attacks[k]["acc_best"]["mean"])
    b = attacks[best_attack]
    n = len(ls_vals)
    if n < 2:
        verdict, reason = "inconclusive", f"{n} seed: too few for a test"
    elif b["margin"] > 0 and b["significant"]:
        verdict, reason = (
            "distillable",
            f"{best_attack} beats the best LS student by {b['margin']:.2f} (p={b['p_value']:.3g}; "
            f"Holm-adjusted over {len(attacks)} attacks p={b['p_holm']:.3g})",
        )
    elif b["margin"] > 0:
        verdict, reason = (
            "inconclusive",
            f"{best_attack} is ahead by {b['margin']:.2f}, not significant (p={b['p_value']:.3g})",
        )
    else:
        verdict, reason = "undistillable", f"no attack beats the best LS student ({best_ls})"
    last_ls = max(ls[k]["acc_last"]["mean"] for k in ls)
    return {
        "best_ls": best_ls,
        "ls_acc": ls[best_ls]["acc_best"]["mean"],
        "best_attack": best_attack,
        "margin": b["margin"],
        "margin_se": b["margin_se"],
        "p_value": b["p_value"],
        "p_holm": b["p_holm"],
        "margin_last": max(a["acc_last"]["mean"] for a in attacks.values()) - last_ls,
        "verdict": verdict,
        "reason": reason,
    }


def combine_verdicts(verdicts: list[str]) -> str:
    if "distillable" in verdicts:
        return "distillable"
    return "undistillable" if all(v == "undistillable" for v in verdicts) else "inconclusive"


# ---------------------------------------------------------------- the audit


@dataclass
class BlackBox:
    """What an attacker queries: a teacher (one per seed, or one for all) served through an output mode
    and, optionally, a fitted serving policy (one per seed, or one for all)."""

    models: list[nn.Module]
    mode: OutputMode = field(default_factory=OutputMode)
    policies: list[Any] | None = None

    def oracle(self, seed_index: int, device: torch.device) -> Oracle:
        model = self.models[seed_index % len(self.models)].to(device).eval()
        if self.policies is None:
            return Oracle(model, self.mode)
        return Oracle(
            model, self.mode, policy=self.policies[seed_index % len(self.policies)], seed=seed_index
        )


def serve_box(models: list[nn.Module], mode: OutputMode, policy: PolicyConfig, data: Dataset) -> BlackBox:
    """A black box serving `models` through `mode` and `policy`, the policy fitted to each model.

    Centroids come from the training split; per-query detector thresholds are calibrated on the first
    half of the test split (held-out clean inputs: on the training inputs a teacher is over-confident
    and the flag rate would be under-estimated); the honest-user cost is measured on the second half.
    """
    if policy == PolicyConfig():
        return BlackBox(models, mode)
    calib = data.x_test[: len(data.x_test) // 2]
    return BlackBox(models, mode, [fit_policy(policy, m, data.x_train, data.y_train, calib) for m in models])


def serving_summary(box: BlackBox, data: Dataset) -> dict[str, Any]:
    """The served output mode and policy, and what they cost honest users (means over per-seed teachers)."""
    half = len(data.x_test) // 2
    x, y = data.x_test[half:], data.y_test[half:]
    policies: list[FittedPolicy | None] = box.policies or [None] * len(box.models)
    costs = [honest_cost(m, box.mode, p, x, y) for m, p in zip(box.models, policies, strict=False)]
    return {
        "output_mode": box.mode.model_dump(),
        "policy": box.policies[0].config.model_dump() if box.policies else PolicyConfig().model_dump(),
        "honest_cost": {k: float(np.mean([c[k] for c in costs])) for k in costs[0]},
    }


def _models(m: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [m] if isinstance(m, nn.Module) else list(m)


def teacher_summary(models: nn.Module | Sequence[nn.Module], data: Dataset) -> dict[str, Any]:
    """Accuracy and I_T curves of a teacher (means over the per-seed teachers when several)."""
    ms = _models(models)
    per = []
    for m in ms:
        logits = model_logits(m, data.x_test)
        per.append(
            {
                "accuracy": accuracy(logits, data.y_test),
                "cmi_test": cmi_by_temperature(logits, data.y_test, CMI_CURVE_TEMPERATURES),
                "cmi_train": cmi_by_temperature(
                    model_logits(m, data.x_train), data.y_train, CMI_CURVE_TEMPERATURES
                ),
            }
        )
    out: dict[str, Any] = {
        "accuracy": float(np.mean([p["accuracy"] for p in per])),
        "cmi_test": {t: float(np.mean([p["cmi_test"][t] for p in per])) for t in per[0]["cmi_test"]},
        "cmi_train": {t: float(np.mean([p["cmi_train"][t] for p in per])) for t in per[0]["cmi_train"]},
    }
    if len(per) > 1:
        out["accuracy_stats"] = summarise([p["accuracy"] for p in per])
    return out


def _ls_rows(cfg: AuditConfig) -> list[tuple[str, float, bool]]:
    return [
        (f"ls{'_mixup' if m else ''}_{e:g}", e, m)
        for m in ([False, True] if cfg.ls_mixup else [False])
        for e in cfg.ls_eps
    ]


@dataclass
class SeedJob:
    """Everything one seed of an audit needs; picklable, so a spawned worker can run it."""

    cfg: AuditConfig
    teachers: dict[str, BlackBox]
    data: Dataset
    num_classes: int
    attack_rows: list[tuple[str, str, BaseModel]]
    ls_rows: list[tuple[str, float, bool]]
    budget_teachers: list[str]
    transfer: Tensor | None

    def attack_runs(self, teacher_keys: list[str]) -> list[Run]:
        return [
            Run(name, arch, teacher=t, attack=ATTACKS.get(key)(self.num_classes, params))
            for arch in self.cfg.students
            for t in teacher_keys
            for name, key, params in self.attack_rows
        ]

    def tasks(self) -> list[tuple[int, int | None]]:
        """(seed index, phase) pairs: phase None trains the LS students and the unlimited attackers,
        phase B the attackers holding B cached answers; the phases of a seed are independent."""
        return [
            (s, phase) for s in range(self.cfg.seeds) for phase in [None, *(self.cfg.query_budgets or [])]
        ]

    def __call__(
        self, s: int, phase: int | None, report: Callable[[int, str], None]
    ) -> list[tuple[Any, ...]]:
        """Train one phase of seed index s (with a budget: one cached lockstep per view count).

        Returns ((phase, teacher, arch, row), best acc, last acc, fidelity, queries) per student;
        `report(done, message)` gets the task's progress in epochs of the unlimited schedule.
        """
        cfg, data, done = self.cfg, self.data, 0
        seed, device = cfg.base_seed + s, resolve_device(cfg.device)
        # one attacker = one API key: a fresh oracle (query history) per phase
        oracles = {t: box.oracle(s, device) for t, box in self.teachers.items()}
        out: list[tuple[Any, ...]] = []

        def record(runs: list[Run], n_queries: Callable[[Run], int]) -> None:
            out.extend(
                ((phase, r.teacher, r.arch, r.name), max(r.acc), r.acc[-1], r.fidelity, n_queries(r))
                for r in runs
            )

        def ticker(message: str) -> Callable[[int, int], None]:
            def tick(epoch: int, epochs: int) -> None:
                report(done + round(epoch * cfg.epochs / epochs), f"{message}, epoch {epoch}/{epochs}")

            return tick

        if phase is None:
            runs = [Run(name, arch, eps=e, mixup=m) for arch in cfg.students for name, e, m in self.ls_rows]
            runs += self.attack_runs(list(self.teachers))
            tick = ticker(f"seed {s + 1}/{cfg.seeds}")
            train_lockstep(runs, data, oracles, cfg, seed, on_epoch=tick, transfer=self.transfer)
            record(runs, lambda r: cfg.epochs * len(data.x_train) * len(r.views) if r.teacher else 0)
            return out
        pending = self.attack_runs(self.budget_teachers)
        # every attack spends exactly B queries: attacks with as many views share one cached set
        for n_views in dict.fromkeys(len(r.views) for r in pending):
            group = [r for r in pending if len(r.views) == n_views]
            tick = ticker(f"seed {s + 1}/{cfg.seeds}, budget {phase}, {n_views}-view attacks")
            train_lockstep(
                group, data, oracles, cfg, seed, on_epoch=tick, budget=phase, transfer=self.transfer
            )
            record(group, lambda r: phase // len(r.views) * len(r.views))
            done += cfg.epochs
        return out


_WORKER_QUEUE: Any = None
Task = tuple[int, int | None]


def _worker_init(queue: Any, threads: int) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = queue
    torch.set_num_threads(threads)


def _worker_task(job: SeedJob, task: Task) -> list[tuple[Any, ...]]:
    return job(*task, lambda done, message: _WORKER_QUEUE.put((task, done, message)))


def _run_tasks(
    job: SeedJob, workers: int, tick: Callable[[Task, int, str], None]
) -> Iterator[list[tuple[Any, ...]]]:
    """Each task's records, in task order: in this process, or in `workers` spawned processes."""
    tasks = job.tasks()
    workers = min(workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            yield job(*task, lambda done, message, task=task: tick(task, done, message))
        return
    import queue as queue_lib

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    threads = max(1, torch.get_num_threads() // workers)
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(messages, threads))
    try:
        # the longest tasks (the unlimited phases, which also train the LS students) go first
        order = sorted(range(len(tasks)), key=lambda i: tasks[i][1] is not None)
        pending = {i: pool.apply_async(_worker_task, (job, tasks[i])) for i in order}
        while not all(p.ready() for p in pending.values()):
            try:
                tick(*messages.get(timeout=0.5))  # a cancel raised here terminates the workers below
            except queue_lib.Empty:
                pass
        results = [pending[i].get() for i in range(len(tasks))]  # re-raises a worker's exception here
    finally:
        pool.terminate()
        pool.join()
    while True:  # progress sent just before a worker finished
        try:
            tick(*messages.get_nowait())
        except queue_lib.Empty:
            break
    yield from results


def run_audit(
    cfg: AuditConfig,
    teacher: nn.Module | Sequence[nn.Module],
    dataset: Dataset,
    *,
    control: nn.Module | Sequence[nn.Module] | None = None,
    protections: dict[str, BlackBox] | None = None,
    budget_for: Sequence[str] | None = None,
    workers: int = 1,
    on_progress: Callable[[AuditProgress], None] | None = None,
) -> dict[str, Any]:
    """Audit a teacher as it will be served; returns the versioned JSON report.

    `budget_for` names the black boxes ("teacher", "control", protection names) attacked under the
    query budgets (default: all). `workers` > 1 trains that many seeds (and budget phases) at once in
    spawned processes, each with its share of the CPU threads; the report is the same as with one.

    `teacher` and `control` may be one model or one per seed (seed i attacks model i); `protections`
    adds further black boxes (a teacher plus its serving policy) attacked in the same lockstep, against
    the same LS students; each gets its own section and verdict under report["protections"].
    """
    t0 = time.perf_counter()
    if cfg.control and control is None:
        raise ValueError("the audit asks for a CE control (control=true) but no control teacher was given")
    data = (
        dataset.subset_train(cfg.labelled_fraction, cfg.base_seed) if cfg.labelled_fraction < 1 else dataset
    )
    cfg = cfg.model_copy(update={"query_budgets": cfg.budgets(len(data.x_train))})  # the report states them
    transfer = None
    if cfg.transfer is not None:
        pool = load_dataset(cfg.transfer, **cfg.transfer_params)
        if tuple(pool.input_shape) != tuple(dataset.input_shape):
            raise ValueError(
                f"transfer set {cfg.transfer!r} has inputs {pool.input_shape}; "
                f"the audit's data has {dataset.input_shape}"
            )
        transfer = pool.x_train[: cfg.transfer_size]
    teachers = {"teacher": serve_box(_models(teacher), cfg.output_mode, cfg.policy, dataset)}
    if cfg.compare_raw and (cfg.output_mode.kind != "probs" or cfg.policy != PolicyConfig()):
        teachers["teacher_raw"] = BlackBox(_models(teacher))
    if cfg.control:
        teachers["control"] = serve_box(_models(control), cfg.output_mode, cfg.policy, dataset)
    for name, box in (protections or {}).items():
        if name in teachers:
            raise ValueError(f"protection name {name!r} is reserved")
        teachers[name] = box
    attack_rows, ls_rows = cfg.attack_rows(), _ls_rows(cfg)
    # phase None: unlimited queries (and the LS students); phase B: attackers holding B cached answers
    budget_teachers = [t for t in (teachers if budget_for is None else budget_for) if t != "teacher_raw"]
    unknown = sorted(set(budget_teachers) - set(teachers))
    if unknown:
        raise ValueError(f"budget_for names no audited black box: {', '.join(unknown)}")
    if not budget_teachers:  # the report states the budgets that were run
        cfg = cfg.model_copy(update={"query_budgets": []})
    jobs_per_seed = 1 + len(cfg.query_budgets) * len({len(ATTACKS.get(k).views) for _, k, _ in attack_rows})
    total = cfg.seeds * cfg.epochs * jobs_per_seed
    done: dict[Task, int] = {}

    def tick(task: Task, task_done: int, message: str) -> None:
        done[task] = task_done
        if on_progress is not None:
            on_progress(AuditProgress(stage="audit", done=sum(done.values()), total=total, message=message))

    job = SeedJob(cfg, teachers, data, dataset.num_classes, attack_rows, ls_rows, budget_teachers, transfer)
    results: dict[tuple[int | None, str | None, str, str], dict[str, list[float]]] = {}
    queries: dict[tuple[int | None, str | None, str, str], int] = {}
    for records in _run_tasks(job, workers, tick):  # in seed order, whatever the number of workers
        for key, best, last, fidelity, n_queries in records:
            rec = results.setdefault(key, {"best": [], "last": [], "fidelity": []})
            rec["best"].append(best)
            rec["last"].append(last)
            rec["fidelity"].append(fidelity)
            queries[key] = n_queries

    def rows_for(phase: int | None, teacher_key: str | None, arch: str, names: list[str]) -> dict[str, Any]:
        stats = ("best", "last", "fidelity")
        return {
            n: _row_stats(
                *(results[(phase, teacher_key, arch, n)][k] for k in stats),
                queries[(phase, teacher_key, arch, n)],
            )
            for n in names
        }

    ls_names, attack_names = [r[0] for r in ls_rows], [r[0] for r in attack_rows]

    def section(phase: int | None, t: str) -> dict[str, Any]:
        per_student = {}
        for arch in cfg.students:
            ls = rows_for(None, None, arch, ls_names)
            attacks = rows_for(phase, t, arch, attack_names)
            if cfg.transfer:  # the baseline: the better of LS and hard-label copying on the same queries
                ls = ls | {"hard_label_transfer": attacks.pop("hard_label")}
            per_student[arch] = {"ls": ls, "attacks": attacks, **judge(ls, attacks, cfg.alpha)}
        return {
            "students": per_student,
            "verdict": combine_verdicts([v["verdict"] for v in per_student.values()]),
        }

    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "config": cfg.model_dump(mode="json"),
        "threat_model": {
            "output_mode": cfg.output_mode.model_dump(),
            "labelled_fraction": cfg.labelled_fraction,
            "labelled_samples": len(data.x_train),
            "query_augmentation": "the student's own view; mixup for fm; mixing ratios in edge_range for "
            "fm_edge; Gaussian noise of noise_scale stds for fm_noise; a second strong view for mlkd",
            "epochs": cfg.epochs,
            "queries_per_view_per_epoch": len(data.x_train),
            "query_budgets": cfg.query_budgets,
            "transfer": None
            if transfer is None
            else {"dataset": cfg.transfer, "params": cfg.transfer_params, "samples": len(transfer)},
        },
        "dataset": {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint,
            "n_train": len(dataset.x_train),
            "n_test": len(dataset.x_test),
        },
        "teacher": {
            **teacher_summary(teacher, dataset),
            "serving": serving_summary(teachers["teacher"], dataset),
        },
        **section(None, "teacher"),
    }
    if "teacher_raw" in teachers:
        report["raw_probabilities"] = section(None, "teacher_raw")
    if cfg.control:
        report["control"] = {
            "arch": cfg.control_arch,
            **teacher_summary(control, dataset),
            "serving": serving_summary(teachers["control"], dataset),
            **section(None, "control"),
        }
    if protections:
        report["protections"] = {
            name: {
                **teacher_summary(box.models, dataset),
                "serving": serving_summary(box, dataset),
                **section(None, name),
            }
            for name, box in protections.items()
        }
    if cfg.query_budgets:
        report["budgets"] = {t: {str(b): section(b, t) for b in cfg.query_budgets} for t in budget_teachers}
        report["safe_budget"] = {t: safe_budget(report["budgets"][t], cfg.students) for t in budget_teachers}
    report["verdict_reason"] = "; ".join(f"{a}: {v['reason']}" for a, v in report["students"].items())
    if cfg.control and report["verdict"] == "undistillable" and report["control"]["verdict"] != "distillable":
        report["verdict"] = "inconclusive"
        report["verdict_reason"] += (
            "; the CE control is not found distillable either, so this audit cannot discriminate"
        )
    elif not cfg.control:
        report["control"] = None
        report["verdict_reason"] += (
            "; no CE control was run, so the audit's power to discriminate is unchecked"
        )
        if report["verdict"] == "undistillable":
            # Without a control the audit cannot show it would have caught a copyable teacher.
            report["verdict"] = "inconclusive"
            report["verdict_reason"] += ", and the verdict cannot be undistillable"
    report["statement"] = protection_statement(report)
    report["wall_s"] = time.perf_counter() - t0
    return report


def protection_statement(report: dict[str, Any]) -> dict[str, Any]:
    """What the protection as served stops and what it does not, in plain words, from the measurements."""
    mode = report["threat_model"]["output_mode"]["kind"]
    policy = report["teacher"]["serving"]["policy"]
    served = {"probs": "full probabilities", "topk": "top-k probabilities", "label": "labels only"}.get(
        mode, "rounded probabilities"
    )
    if policy.get("snap"):
        served += ", snapped to class centroids"
    if policy.get("detector", "none") != "none":
        served += f", {policy['detector']} detector -> {policy['action']}"
    stops, leaks = [], []
    for arch, s in report["students"].items():
        for name, row in s["attacks"].items():
            if row["margin"] <= 0:
                stops.append(f"{name} ({arch})")
            else:
                sig = "significant" if row["significant"] else "not significant"
                leaks.append(f"{name} ({arch}): {row['margin']:+.2f} ± {row['margin_se']:.2f}, {sig}")
    queries = max(
        (r["queries"] for s in report["students"].values() for r in s["attacks"].values()), default=0
    )
    lines = [
        f"Served as {served}. Against attackers querying throughout their training ({queries:,} queries "
        "each at most), "
        + (
            "no knockoff beat the best label-smoothing student."
            if not leaks
            else f"{len(leaks)} of {len(stops) + len(leaks)} knockoffs beat the best label-smoothing "
            "student on average: " + "; ".join(leaks) + "."
        )
    ]
    safe = report.get("safe_budget", {}).get("teacher")
    if safe:
        low = min(safe.values())
        lines.append(
            f"With at most {low:,} queries per key (the safe budget, the served model's default per-key "
            "budget) no knockoff beat it. A budget per key holds only as far as keys are controlled: an "
            f"attacker with n keys holds n x {low:,} queries."
            if low
            else "No tested query budget was safe: a knockoff beat label smoothing at the smallest one."
        )
    return {"served_as": served, "stops": stops, "does_not_stop": leaks, "text": " ".join(lines)}


def safe_budget(by_budget: dict[str, dict[str, Any]], students: list[str]) -> dict[str, int]:
    """Per student: the largest tested budget at or below which no knockoff's mean beats the best LS mean."""
    out = {}
    for arch in students:
        safe = 0
        for b in sorted(by_budget, key=int):
            if by_budget[b]["students"][arch]["margin"] > 0:
                break
            safe = int(b)
        out[arch] = safe
    return out


# ---------------------------------------------------------------- benchmark


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
