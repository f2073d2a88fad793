"""What every attack shares: the step context, the adapter base class, the registry and the loss math.

An attack sees only what a black-box thief sees: the teacher's SERVED answer on exactly the inputs
the student is trained on (probabilities, possibly with exact zeros, one-hot under label-only
serving) and the attacker's own labels. The attacker re-tempers served probabilities itself
(`temper`), which for full probabilities equals tempering the teacher's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ml.registry import Registry


@dataclass(frozen=True)
class AttackContext:
    """Where the knockoff's training stands: `epoch` is 0-based, `epochs` the total."""

    epoch: int
    epochs: int
    num_classes: int


class AttackParams(BaseModel):
    """Base of every attack's hyper-parameters: typed, validated, unknown names rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelCEParams(AttackParams):
    """Base of the attacks that also fit the attacker's own labels, with a weighted CE term."""

    ce_weight: float = Field(1.0, ge=0, description="weight of CE with the attacker's labels")


# ---------------------------------------------------------------- shared pure math


def temper(p: Tensor, T: float | Tensor) -> Tensor:
    """p^(1/T) renormalised per row (= softmax(log p / T) for p > 0); zeros stay 0, one-hot stays one-hot."""
    log_p = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
    # Masking after the division (not log 0 = -inf before it) keeps the gradient in T finite when T
    # is learned (ctkd).
    return torch.softmax((log_p / T).masked_fill(p <= 0, float("-inf")), dim=-1)


def kl_rows(p_target: Tensor, log_q: Tensor) -> Tensor:
    """Per-sample KL(p || q) = sum_c [p_c log p_c - p_c log q_c], with 0 log 0 = 0; log_q must be finite."""
    # xlogy gives 0 log 0 = 0; the clamp keeps its gradient finite (not 0 / 0) where a learned target
    # (ctkd's tempered top-k answers, mkd's mapped ones) is exactly 0.
    entropy_part = torch.xlogy(p_target, p_target.clamp_min(torch.finfo(p_target.dtype).tiny))
    return (entropy_part - p_target * log_q).sum(-1)


def kl_batchmean(p_target: Tensor, log_q: Tensor) -> Tensor:
    """'batchmean' KL: mean_i sum_c [p_ic log p_ic - p_ic log q_ic]."""
    return kl_rows(p_target, log_q).mean()


def soft_ce(p_target: Tensor, log_q: Tensor) -> Tensor:
    """Cross entropy with soft targets: -mean_i sum_c p_ic log q_ic."""
    return -(p_target * log_q).sum(-1).mean()


def distill_kl(target: Tensor, logits: Tensor, T: float | Tensor) -> Tensor:
    """T^2 KL(target || softmax(z / T)), batchmean; T^2 keeps gradient sizes comparable across T."""
    return T**2 * kl_batchmean(target, torch.log_softmax(logits / T, dim=-1))


def tempered_kl(p_teacher: Tensor, logits: Tensor, T: float | Tensor) -> Tensor:
    """The Hinton term T^2 KL(temper(p_t, T) || softmax(z_s / T))."""
    return distill_kl(temper(p_teacher, T), logits, T)


def drop_target(p: Tensor, targets: Tensor) -> Tensor:
    """Non-target distribution: p with the target class zeroed, renormalised (an all-zero rest stays 0)."""
    rest = p.scatter(-1, targets[:, None], 0.0)
    return rest / rest.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def target_split(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Of softmax(z): (log p_gt, log(1 - p_gt), log of the renormalised non-target distribution).

    Shapes (B, 1), (B, 1), (B, C); the target entry of the last is finite and meaningless (pair it
    with a target distribution that is 0 there).
    """
    lse_all = torch.logsumexp(logits, dim=-1, keepdim=True)
    # -inf only enters logsumexp, whose gradient there is exactly 0; everything returned is finite.
    lse_rest = torch.logsumexp(logits.scatter(-1, targets[:, None], float("-inf")), dim=-1, keepdim=True)
    log_p_gt = logits.gather(-1, targets[:, None]) - lse_all
    return log_p_gt, lse_rest - lse_all, logits - lse_rest


# ---------------------------------------------------------------- the adapter and its registry


class Attack(nn.Module):
    """Thin adapter around a pure loss; an nn.Module so learnable attack parameters train with the student.

    The engine builds every input view in `views` once per batch, queries the teacher once per view,
    runs the student on it, and calls forward(student, teacher, targets, ctx) with
    student[view] = student logits, teacher[view] = served answers on the same inputs, and
    targets = the attacker's labels. It sums every value of the returned dict.

    Most attacks only name their pure `loss`: the default forward calls
    loss(student["plain"], teacher["plain"], targets, **hyper(ctx)), where `hyper` gives the loss its
    keyword arguments (by default the parameters by name; learned or scheduled ones are added there).
    """

    key: ClassVar[str]  # key, Params, loss and paper are set by `register`
    paper: ClassVar[str]
    Params: ClassVar[type[AttackParams]]
    loss: ClassVar[Callable[..., dict[str, Tensor]]]
    views: ClassVar[tuple[str, ...]] = ("plain",)
    # skeptical: the engine also passes student["features"], the input of the student's last layer on
    # the plain view, and calls setup(feature_dim) once before it collects the parameters and moves
    # the attack to the training device.
    needs_features: ClassVar[bool] = False
    # Every returned term is a mean over the batch's rows of per-row values: the audit then computes
    # the loss of many students of this row in one call on their stacked rows (ml/audit/losses.py).
    row_separable: ClassVar[bool] = False
    # Default audit rows, when not the single row named by the key: (row name, parameter overrides).
    sweep: ClassVar[tuple[tuple[str, dict[str, Any]], ...]] = ()

    def __init__(self, num_classes: int, params: AttackParams | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an attack needs at least 2 classes, got {num_classes}")
        params = self.Params() if params is None else params
        if not isinstance(params, self.Params):
            raise TypeError(f"attack {self.key!r} takes {self.Params.__name__}, got {type(params).__name__}")
        self.num_classes = num_classes
        self.params = params
        self.build()

    def build(self) -> None:
        """Create what the attack derives from its parameters and classes (learned tensors included)."""

    def setup(self, feature_dim: int) -> None:
        """Create parameters that depend on the student (only attacks with needs_features use it)."""

    def hyper(self, ctx: AttackContext) -> dict[str, Any]:
        """The loss's keyword arguments at this step: the parameters, by name (their values as given)."""
        return dict(self.params)

    def forward(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], targets: Tensor, ctx: AttackContext
    ) -> dict[str, Tensor]:
        """Named loss terms for one batch (0-d tensors); the engine sums them."""
        return self.loss(student["plain"], teacher["plain"], targets, **self.hyper(ctx))


ATTACKS: Registry[type[Attack]] = Registry("attack")


def register(
    key: str, params: type[AttackParams], loss: Callable[..., dict[str, Tensor]] | None = None, *, paper: str
) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: the attack's key, its parameters, (for the default forward) its pure loss and the
    paper it implements; registers the class under `key`."""

    def decorate(cls: type[Attack]) -> type[Attack]:
        cls.key, cls.Params, cls.paper = key, params, paper
        if loss is not None:
            cls.loss = staticmethod(loss)
        return ATTACKS.register(key)(cls)

    return decorate


class AttackInfo(NamedTuple):
    key: str
    paper: str
    defaults: dict[str, Any]
    views: tuple[str, ...]


def build_params(key: str, **overrides: Any) -> AttackParams:
    """The attack's Params with overrides; an unknown name raises ValueError listing the valid ones."""
    cls = ATTACKS.get(key)
    valid = list(cls.Params.model_fields)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for attack {key!r}; valid: {', '.join(valid)}"
        )
    return cls.Params(**overrides)


def make_attack(key: str, num_classes: int, **overrides: Any) -> Attack:
    """Build a registered attack with its default parameters updated by `overrides`."""
    return ATTACKS.get(key)(num_classes, build_params(key, **overrides))


def rows(key: str) -> list[tuple[str, AttackParams]]:
    """Default audit rows of an attack: its sweep (kd: one per temperature), else one row named by the key."""
    cls = ATTACKS.get(key)
    if cls.sweep:
        return [(name, build_params(key, **overrides)) for name, overrides in cls.sweep]
    return [(key, cls.Params())]


def attack_infos() -> list[AttackInfo]:
    """(key, paper, default parameters, views) of every registered attack, in registry order."""
    return [AttackInfo(k, c.paper, c.Params().model_dump(), c.views) for k, c in ATTACKS.items()]
