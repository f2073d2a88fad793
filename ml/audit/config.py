"""The audit's configuration: students, attacks, seeds, schedule, LS sweep, control, threat model."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ml.attacks import ATTACKS, build_params, rows
from ml.data import DATASETS
from ml.evidence.nulls import check_null_family
from ml.models import MODELS
from ml.oracle import OutputMode
from ml.policy import PolicyConfig
from ml.train import MAX_SEED, OptimConfig

REPORT_VERSION = 1
# What the evidence null trains (its own task, `ml.audit.tasks.AuditTask.key`): not in the plan's fingerprint.
NULL_FIELDS = {"null_archs", "null_models"}
# Label-only answers plus a per-key budget is the best protection our benchmark found: at 25 passes
# (100k queries) no knockoff of it beat the LS student (docs/calibration.md).
DEFAULT_BUDGET_PASSES = (1, 5, 25)
CMI_CURVE_TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


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
    null_archs: list[str] | None = Field(
        None,
        max_length=8,
        description="evidence: families of independent models of other architectures in the null, "
        "null_models per seed each (a zoo architecture, or the scikit-learn null 'logistic' or 'forest'). "
        "None (the default): the zoo's other small student families that fit the input (ml.evidence.nulls); "
        "[] none",
    )
    null_models: int = Field(
        1,
        ge=1,
        le=8,
        description="evidence: independent models of each null family per seed, each from its own seed. "
        "More let the selected challenge be chosen against a family on half the seeds and measured on the "
        "other half (a held-out family enters the null with at least 5 models)",
    )
    device: str = "auto"

    @field_validator("null_archs")
    @classmethod
    def _null_families(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [check_null_family(name) for name in v]

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


def ls_recipes(cfg: AuditConfig) -> list[tuple[str, float, bool]]:
    """(row name, eps, mixup) of every label-smoothing student."""
    return [
        (f"ls{'_mixup' if m else ''}_{e:g}", e, m)
        for m in ([False, True] if cfg.ls_mixup else [False])
        for e in cfg.ls_eps
    ]
