"""One trainer for every teacher: seeded, resumable, with a per-epoch callback.

The audit trains its students with its own lockstep loop but shares the optimiser, schedule,
device and seeding helpers defined here.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from ml.checkpoint import ModelMeta, build_from_meta, check_state, read_weights
from ml.cmi import DEFAULT_LOG_TEMPERATURES, cmi_by_temperature, model_logits, split_cmi
from ml.data import AUGMENTATIONS, DATASETS, Dataset, load_dataset
from ml.models import MODELS, build_model
from ml.objectives import OBJECTIVES, StepContext, make_objective

MAX_SEED = 2**31 - 1  # every seed fits torch, numpy and Python generators alike


class TrainingCancelled(Exception):
    """Raised by a progress callback to stop training cooperatively."""


class OptimConfig(BaseModel):
    """Optimiser and schedule: AdamW + per-step cosine, or SGD + multistep."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(60, ge=1, le=100_000)
    batch_size: int = Field(128, ge=2, le=65_536)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-2, gt=0, le=10)
    weight_decay: float = Field(1e-2, ge=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[Annotated[int, Field(ge=1, le=100_000)]] = Field(
        default_factory=list, max_length=32, description="multistep: epochs where lr *= gamma"
    )
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(
        0.0, ge=0, le=100_000, description="linear learning-rate warm-up over this many epochs"
    )


class TrainConfig(OptimConfig):
    """A teacher training run: data, architecture, objective, budget, seed."""

    dataset: str = "mnist1d"
    dataset_params: dict[str, Any] = Field(default_factory=dict, max_length=32)
    arch: str = "cnn1d"
    objective: str = "cmim"
    objective_params: dict[str, Any] = Field(default_factory=dict, max_length=32)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    augment: bool = True
    augmentation: str | None = Field(
        None,
        max_length=32,
        description="training augmentation: none, feature_noise (tabular), shift_noise (signals), crop_flip "
        "(images); null: the data set's own (none for tabular data)",
    )
    device: str = "auto"
    log_temperatures: list[Annotated[float, Field(gt=0, le=1000)]] = Field(
        list(DEFAULT_LOG_TEMPERATURES), min_length=1, max_length=16
    )

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        DATASETS.get(v)
        return v

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        MODELS.get(v)
        return v

    @field_validator("augmentation")
    @classmethod
    def _augmentation(cls, v: str | None) -> str | None:
        if v is not None and v not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {v!r}; valid choices: {', '.join(AUGMENTATIONS)}")
        return v

    def prepare(self, data: Dataset) -> Dataset:
        """The data set with this run's augmentation (ValueError when it does not fit the inputs)."""
        return data.with_augmentation(self.augmentation)

    @model_validator(mode="after")
    def _objective(self) -> TrainConfig:
        OBJECTIVES.get(self.objective)
        make_objective(self.objective, self.objective_params)
        return self


class EpochReport(BaseModel):
    """One epoch's progress event: losses, accuracies (percent) and test I_T."""

    stage: str = "teacher"
    epoch: int
    epochs: int
    losses: dict[str, float]
    train_acc: float
    test_acc: float
    cmi: dict[str, float] = Field(default_factory=dict)
    lr: float = 0.0
    seconds: float = 0.0
    device: str = Field("", description="where this epoch ran: 'cpu' or 'cuda (NVIDIA ...)'")


@dataclass
class TrainResult:
    model: nn.Module
    meta: ModelMeta
    history: list[EpochReport] = field(default_factory=list)
    best_acc: float = 0.0
    last_acc: float = 0.0


# ---------------------------------------------------------------- shared helpers


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """'cpu', or 'cuda (NVIDIA H200)': what a progress event says about where a stage runs."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def make_optimizer(params: Iterable[Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def make_schedule(
    opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: cosine to 0 over all steps, or gamma^(milestones passed), or 1; times a linear
    warm-up (s + 1) / warm-up steps over the first warmup_epochs."""
    total = cfg.epochs * steps_per_epoch
    warm = max(1.0, cfg.warmup_epochs * steps_per_epoch)
    marks = sorted(m * steps_per_epoch for m in cfg.milestones)

    def base(s: int) -> float:
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        if cfg.schedule == "multistep":
            return cfg.gamma ** sum(s >= m for m in marks)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: base(s) * min(1.0, (s + 1) / warm))


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A shuffled epoch of index batches (the last may be smaller)."""
    perm = torch.randperm(n, generator=generator)
    return list(perm.split(batch_size))


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


_HEAP_KEPT: bool | None = None  # None: not tried yet in this process


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees, for the next step; True if it does.

    A step allocates and frees the same tensors of a few MB every time. By default glibc maps large
    blocks fresh and trims its heap, so every step pays page faults again for memory it just freed:
    here 3x as many page faults, and audit epochs 1.03-1.05x slower (docs/performance.md). Blocks up
    to 32 MiB stay on the heap and up to 1 GiB of freed heap is kept. The numbers are the same; once
    per process (the embedded service's worker shares the API's); nothing where the C library is not
    glibc.
    """
    global _HEAP_KEPT
    if _HEAP_KEPT is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_mmap_threshold, m_trim_threshold = -3, -1  # glibc's mallopt parameters (malloc.h)
            # both: setting either one stops glibc from raising the mmap threshold itself, so the trim
            # threshold alone leaves it at 128 KiB and every large block mapped fresh (1.6x slower epochs)
            kept = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
            _HEAP_KEPT = bool(kept)
        except (OSError, AttributeError):
            _HEAP_KEPT = False
    return _HEAP_KEPT


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNGs and return a CPU generator for data order and augmentation."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the trainer


def train_model(
    cfg: TrainConfig,
    dataset: Dataset | None = None,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    state_path: str | Path | None = None,
    init_weights: str | Path | dict[str, torch.Tensor] | None = None,
    init_meta: ModelMeta | None = None,
    stage: str = "teacher",
) -> TrainResult:
    """Train a model as cfg says; resumes from state_path when it exists and rewrites it every epoch.

    With init_weights it fine-tunes that model (rebuilt from init_meta when given, so its own input
    normalisation is kept) and records its test accuracy before and after (`metrics["fine_tune"]`)."""
    keep_freed_memory()
    data = cfg.prepare(dataset if dataset is not None else load_dataset(cfg.dataset, **cfg.dataset_params))
    device = resolve_device(cfg.device)
    gen = seed_everything(cfg.seed)
    acc_before = None
    if init_weights is not None:  # fine-tuning an owner's existing model
        model = init_model(cfg, data, init_weights, init_meta)
        acc_before = accuracy(model_logits(model, data.x_test), data.y_test)
    else:
        model = build_model(cfg.arch, data.input_shape, data.num_classes, mean=data.mean, std=data.std)
    model.to(device)
    if device.type == "cuda" and len(data.input_shape) == 3:
        model.to(memory_format=torch.channels_last)

    objective = make_objective(cfg.objective, cfg.objective_params)
    reference = None
    if objective.needs_reference:  # nasty: a frozen CE copy trained with the same recipe and seed
        ref_state = Path(state_path).with_name("reference_state.pt") if state_path else None
        ref_cfg = cfg.model_copy(update={"objective": "ce", "objective_params": {}})
        reference = (
            train_model(ref_cfg, data, state_path=ref_state, stage="reference").model.to(device).eval()
        )
        gen = seed_everything(cfg.seed)

    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    steps = math.ceil(len(x_train) / cfg.batch_size)
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_schedule(opt, cfg, steps)
    history: list[EpochReport] = []
    start = 0
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        objective.load_state_dict(state["objective"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = [EpochReport.model_validate(h) for h in state["history"]]
        start = int(state["epoch"])

    use_amp = device.type == "cuda"
    where = describe_device(device)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        # Running sums stay on the device: a host sync per step would stall a GPU on small batches.
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), dtype=torch.long, device=device)
        for i, idx in enumerate(batches(len(x_train), cfg.batch_size, gen)):
            x, y = x_train[idx], y_train[idx]
            if cfg.augment:
                x = data.augment(x, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            logits = logits.float()
            ref_logits = None
            if reference is not None:
                with torch.no_grad():
                    ref_logits = reference(x).float()
            mixed_logits = None
            if objective.needs_mixed:  # a uniform-ratio mixup of the batch, drawn from the run's generator
                perm, lam = torch.randperm(len(x), generator=gen), torch.rand(len(x), generator=gen)
                perm, lam = perm.to(device), lam.to(device).view((-1,) + (1,) * (x.dim() - 1))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    mixed_logits = model(lam * x + (1 - lam) * x[perm]).float()
            ctx = StepContext(epoch + i / steps, cfg.epochs, data.num_classes, gen, ref_logits, mixed_logits)
            terms = objective(logits, y, ctx)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in terms.items():
                term = v.detach().double() * len(idx)
                sums[k] = sums[k] + term if k in sums else term
            correct += (logits.argmax(-1) == y).sum()
        test_logits = model_logits(model, data.x_test)
        report = EpochReport(
            stage=stage,
            epoch=epoch + 1,
            epochs=cfg.epochs,
            losses={k: float(v) / len(x_train) for k, v in sums.items()},
            train_acc=100.0 * int(correct) / len(x_train),
            test_acc=accuracy(test_logits, data.y_test),
            cmi=cmi_by_temperature(test_logits, data.y_test, cfg.log_temperatures),
            lr=opt.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0,
            device=where,
        )
        history.append(report)
        if on_epoch is not None:
            on_epoch(report)
        if state_path is not None:
            _atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "objective": objective.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": [h.model_dump() for h in history],
                    "epoch": epoch + 1,
                },
                state_path,
            )

    model.eval().cpu()
    return _result(model, cfg, data, history, acc_before)


# Fine-tuning that costs more accuracy than this (points) is flagged: the owner should see it first.
FINE_TUNE_WARN_POINTS = 0.5


def fine_tune_defaults(cfg: TrainConfig) -> TrainConfig:
    """A fine-tuning recipe: a tenth of the learning rate and one warm-up epoch unless cfg sets them."""
    update: dict[str, Any] = {}
    if "lr" not in cfg.model_fields_set:
        update["lr"] = cfg.lr / 10
    if "warmup_epochs" not in cfg.model_fields_set:
        update["warmup_epochs"] = min(1.0, cfg.epochs / 2)
    return cfg.model_copy(update=update)


def check_fits(meta: ModelMeta, data: Dataset) -> None:
    """ValueError (one line) unless a model's declared inputs and classes are the data set's."""
    if tuple(meta.input_shape) != tuple(data.input_shape) or meta.num_classes != data.num_classes:
        raise ValueError(
            f"the model takes {tuple(meta.input_shape)} with {meta.num_classes} classes but data set "
            f"{data.name!r} has {tuple(data.input_shape)} with {data.num_classes} classes"
        )


def init_model(
    cfg: TrainConfig, data: Dataset, weights: str | Path | dict[str, Tensor], meta: ModelMeta | None = None
) -> nn.Module:
    """The model a fine-tuning run starts from: its architecture checked against cfg and data, its keys and
    shapes checked (a one-line error lists missing and unexpected keys), then its weights loaded."""
    if meta is not None:
        if meta.arch != cfg.arch:
            raise ValueError(f"the initial model is a {meta.arch!r}, not the requested arch {cfg.arch!r}")
        check_fits(meta, data)
        model = build_from_meta(meta)
    else:
        model = build_model(cfg.arch, data.input_shape, data.num_classes, mean=data.mean, std=data.std)
    state = weights if isinstance(weights, dict) else read_weights(weights)
    check_state(model, state)
    model.load_state_dict(state, strict=True)
    return model


def _result(
    model: nn.Module,
    cfg: TrainConfig,
    data: Dataset,
    history: list[EpochReport],
    acc_before: float | None = None,
) -> TrainResult:
    best = max((h.test_acc for h in history), default=0.0)
    last = history[-1].test_acc if history else 0.0
    temps = cfg.log_temperatures
    metrics = {
        "best_acc": best,
        "last_acc": last,
        "epochs": cfg.epochs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "cmi_train": split_cmi(model, data.x_train, data.y_train, temps),
        "cmi_test": split_cmi(model, data.x_test, data.y_test, temps),
    }
    if acc_before is not None:
        cost = acc_before - last
        metrics["fine_tune"] = {
            "acc_before": acc_before,
            "acc_after": last,
            "cost_points": cost,
            "warning": (
                f"fine-tuning cost {cost:.2f} points of test accuracy ({acc_before:.2f}% -> {last:.2f}%), "
                f"more than {FINE_TUNE_WARN_POINTS}; try a lower lr, more warm-up or a smaller lam"
            )
            if cost > FINE_TUNE_WARN_POINTS
            else None,
        }
    norm = model[0] if isinstance(model, nn.Sequential) else None
    enabled = norm is not None and getattr(norm, "enabled", False)
    meta = ModelMeta(
        arch=cfg.arch,
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        class_names=list(data.class_names),
        # The statistics the model itself holds (a fine-tuned model keeps its own normalisation).
        mean=norm.mean.tolist() if enabled else None,
        std=norm.std.tolist() if enabled else None,
        objective=cfg.objective,
        objective_params=make_objective(cfg.objective, cfg.objective_params).params.model_dump(),
        dataset=data.name,
        dataset_fingerprint=data.fingerprint,
        train_config=cfg.model_dump(),
        metrics=metrics,
    )
    return TrainResult(model=model, meta=meta, history=history, best_acc=best, last_acc=last)
