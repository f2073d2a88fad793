"""Teacher training objectives (a registry): ce, ls, cmim, nasty.

Each objective is a pure loss function plus a thin adapter that holds its parameters and, where
the method needs it, state (EMA centroids, sampled temperatures, the lambda warm-up). Adapters
return named loss terms; the trainer sums every value of the dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from ml.cmi import class_centroids
from ml.registry import Registry

DEFAULT_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StepContext:
    """Where training stands, for warm-ups: epoch is fractional (epoch index + batch fraction)."""

    epoch: float
    epochs: int
    num_classes: int
    generator: torch.Generator | None = None
    reference_logits: Tensor | None = None  # nasty: the frozen CE copy's logits on the same batch
    mixed_logits: Tensor | None = None  # cmim with mixed > 0: the model's logits on a mixup of the batch


# ---------------------------------------------------------------- pure loss functions


def ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy: -mean_i log softmax(z_i)[y_i]."""
    return F.cross_entropy(logits, labels)


def ls_loss(logits: Tensor, labels: Tensor, eps: float) -> Tensor:
    """Label-smoothed CE: (1-eps) CE(z, y) + eps * mean_c(-log softmax(z)_c)."""
    return F.cross_entropy(logits, labels, label_smoothing=eps)


class _FusedCMI(torch.autograd.Function):
    """sum_k w_k (1/B) sum_i KL(P_ik || Q_k,y_i) with Q constant, and its closed-form gradient.

    d/dz_ij = sum_k w_k / (B T_k) * P_ikj * (log P_ikj - log Q_k,y_i,j - KL_ik). Fusing forward and
    backward into a handful of tensor ops removes most of autograd's per-op dispatch, which is
    what the CMI terms cost next to a forward/backward pass.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, log_q: Tensor, temps: Tensor, weights: Tensor) -> Tensor:
        log_p = torch.log_softmax(z.unsqueeze(0) / temps[:, None, None], dim=-1)  # (K, B, C)
        p = log_p.exp()
        a = log_p - log_q
        kl = (p * a).sum(-1)  # (K, B)
        ctx.save_for_backward(p, a, kl, temps, weights)
        return (weights * kl.mean(-1)).sum()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        p, a, kl, temps, weights = ctx.saved_tensors
        scale = (weights / (temps * p.shape[1]))[:, None, None] * grad_out
        return (scale * p * (a - kl.unsqueeze(-1))).sum(0), None, None, None


def cmi_loss(
    logits: Tensor, labels: Tensor, temps: Tensor, weights: Tensor, log_q: Tensor | None = None
) -> Tensor:
    """sum_k w_k I_{T_k} with centroids as constants (in-batch means unless log_q (K, Y, C) is given)."""
    z = logits.float()
    if log_q is None:
        with torch.no_grad():
            p = torch.softmax(z.unsqueeze(0) / temps[:, None, None], dim=-1)
            q, _ = class_centroids(p, labels, z.shape[-1])
            log_q = q.clamp_min(1e-30).log()
    return _FusedCMI.apply(z, log_q[:, labels], temps, weights)


def within_class_variance(logits: Tensor, labels: Tensor) -> Tensor:
    """T -> infinity surrogate: (1/(2C)) mean_i ||c(z_i) - mean_{j in y_i} c(z_j)||^2, c = centring."""
    zc = logits.float() - logits.float().mean(-1, keepdim=True)
    with torch.no_grad():
        mu, _ = class_centroids(zc, labels, logits.shape[-1])
    return (zc - mu[labels]).pow(2).sum(-1).mean() / (2 * logits.shape[-1])


def nasty_loss(logits: Tensor, labels: Tensor, reference_logits: Tensor, tau: float, omega: float) -> Tensor:
    """Nasty Teacher: CE(z, y) - omega tau^2 KL(softmax(z/tau) || softmax(z_ref/tau)), batchmean."""
    log_p = F.log_softmax(logits / tau, dim=-1)
    log_r = F.log_softmax(reference_logits.detach() / tau, dim=-1)
    kl = (log_p.exp() * (log_p - log_r)).sum(-1).mean()
    return F.cross_entropy(logits, labels) - omega * tau**2 * kl


# ---------------------------------------------------------------- adapters and registry


class Objective:
    key: ClassVar[str]
    Params: ClassVar[type[_Params]]
    needs_reference: ClassVar[bool] = False

    def __init__(self, params: _Params) -> None:
        self.params = params

    @property
    def needs_mixed(self) -> bool:
        """Whether the trainer must also pass the model's logits on a mixup of each batch."""
        return False

    def __call__(self, logits: Tensor, labels: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@OBJECTIVES.register("ce")
class CE(Objective):
    """Plain cross entropy."""

    key = "ce"
    Params = _Params

    def __call__(self, logits: Tensor, labels: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        return {"ce": ce_loss(logits, labels)}


class LSParams(_Params):
    eps: float = Field(0.1, ge=0, lt=1, description="label smoothing")


@OBJECTIVES.register("ls")
class LS(Objective):
    """Cross entropy with label smoothing eps."""

    key = "ls"
    Params = LSParams

    def __call__(self, logits: Tensor, labels: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        return {"ls": ls_loss(logits, labels, self.params.eps)}


class CMIMParams(_Params):
    lam: float = Field(1.0, ge=0, description="weight lambda of the CMI terms")
    temperatures: list[float] = Field(list(DEFAULT_GRID), min_length=1, description="temperature grid T_k")
    weights: Literal["t2", "uniform"] = Field("t2", description="w_k proportional to T_k^2, or equal")
    sampled: int = Field(0, ge=0, description="if > 0, log-uniform T per step in the grid's range")
    centroids: Literal["batch", "ema"] = "batch"
    ema_momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(0.0, ge=0, description="lambda ramps linearly from 0 over these epochs")
    surrogate_weight: float = Field(0.0, ge=0, description="weight of the T -> infinity term")
    mixed: float = Field(
        0.0,
        ge=0,
        description="weight of the same CMI terms on mixup inputs (uniform ratios), clustered by the "
        "model's own predicted label: shapes the outputs off the data manifold too (0: off)",
    )

    @model_validator(mode="after")
    def _check(self) -> CMIMParams:
        if any(t <= 0 for t in self.temperatures):
            raise ValueError("temperatures must be positive")
        if self.sampled and self.centroids == "ema":
            raise ValueError("EMA centroids are kept per grid temperature: not with sampled > 0")
        return self


@OBJECTIVES.register("cmim")
class CMIM(Objective):
    """CE + lambda sum_k w_k I_{T_k} (+ surrogate), centroids constant within a step."""

    key = "cmim"
    Params = CMIMParams

    def __init__(self, params: CMIMParams) -> None:
        super().__init__(params)
        self.grid = torch.tensor(params.temperatures, dtype=torch.float32)
        self.log_q_ema: Tensor | None = None  # (K, Y, C), centroids in log space

    def _temperatures(self, ctx: StepContext, device: torch.device) -> Tensor:
        if not self.params.sampled:
            return self.grid.to(device)
        lo, hi = math.log(min(self.params.temperatures)), math.log(max(self.params.temperatures))
        u = torch.rand(self.params.sampled, generator=ctx.generator)  # the trainer's CPU generator
        return (lo + (hi - lo) * u).exp().to(device)

    @property
    def needs_mixed(self) -> bool:
        return self.params.mixed > 0

    def lam(self, ctx: StepContext) -> float:
        w = self.params.warmup_epochs
        return self.params.lam * (min(ctx.epoch / w, 1.0) if w > 0 else 1.0)

    def __call__(self, logits: Tensor, labels: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        temps = self._temperatures(ctx, logits.device)
        weights = temps**2 if self.params.weights == "t2" else torch.ones_like(temps)
        weights = weights / weights.sum()
        log_q = None
        if self.params.centroids == "ema":
            log_q = self._update_ema(logits, labels, temps, ctx.num_classes)
        lam = self.lam(ctx)
        terms = {"ce": ce_loss(logits, labels), "cmi": lam * cmi_loss(logits, labels, temps, weights, log_q)}
        if self.params.mixed:
            if ctx.mixed_logits is None:
                raise ValueError("cmim with mixed > 0 needs the model's logits on mixed inputs")
            pred = ctx.mixed_logits.detach().argmax(-1)  # a mix has no label: cluster by the prediction
            terms["cmi_mixed"] = lam * self.params.mixed * cmi_loss(ctx.mixed_logits, pred, temps, weights)
        if self.params.surrogate_weight:
            terms["cmi_inf"] = lam * self.params.surrogate_weight * within_class_variance(logits, labels)
        return terms

    @torch.no_grad()
    def _update_ema(self, logits: Tensor, labels: Tensor, temps: Tensor, num_classes: int) -> Tensor:
        p = torch.softmax(logits.float().unsqueeze(0) / temps[:, None, None], dim=-1)
        q, counts = class_centroids(p, labels, num_classes)
        if self.log_q_ema is None:  # first batch initialises; classes it lacks start uniform
            self.log_q_ema = torch.full_like(q, -math.log(q.shape[-1]))
            m = torch.zeros(num_classes, device=q.device)
        else:
            m = torch.full((num_classes,), self.params.ema_momentum, device=q.device)
        present = (counts > 0)[None, :, None]
        new = m[None, :, None] * self.log_q_ema.exp() + (1 - m[None, :, None]) * q
        self.log_q_ema = torch.where(present, new.clamp_min(1e-30).log(), self.log_q_ema)
        return self.log_q_ema

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.log_q_ema is None else {"log_q_ema": self.log_q_ema.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.log_q_ema = state.get("log_q_ema")


class NastyParams(_Params):
    tau: float = Field(4.0, gt=0)
    omega: float = Field(0.04, ge=0)


@OBJECTIVES.register("nasty")
class Nasty(Objective):
    """Nasty Teacher (Ma et al., ICLR 2021) against a frozen CE-trained copy."""

    key = "nasty"
    Params = NastyParams
    needs_reference = True

    def __call__(self, logits: Tensor, labels: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        if ctx.reference_logits is None:
            raise ValueError("the nasty objective needs the reference model's logits")
        return {"nasty": nasty_loss(logits, labels, ctx.reference_logits, self.params.tau, self.params.omega)}


def make_objective(name: str, params: dict[str, Any] | None = None) -> Objective:
    """Build an objective from its registry name and parameters (validated; unknown keys refused)."""
    cls = OBJECTIVES.get(name)
    return cls(cls.Params.model_validate(params or {}))
