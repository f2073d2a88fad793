"""Serving policies: a protection is a teacher plus the policy that serves it.

A policy decides, per query, on the RAW teacher output (probabilities, logits, and for PRADA the
key's input history): it scores the query with a detector, picks what the query gets (the plain
probabilities, or the centroid of its predicted class when snapping; a suspicious query gets the
configured action applied to that answer), and only then formats the result with the endpoint's
output mode. Refused rows are all zero. The service keeps one `QueryHistory` per API key, the
audit one per attacker (one attacker = one key).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats
from torch import Tensor, nn

from ml.attacks.base import kl_rows
from ml.cmi import class_centroids, model_logits
from ml.evidence.keyed import KeyedRegion, fit_keyed
from ml.evidence.secret import Secret
from ml.output_mode import OutputMode, apply_output_mode, one_hot_argmax

PER_QUERY_DETECTORS = ("confidence", "energy", "cluster_kl")
# PRADA only tests classes with this many distances, and drops distances beyond 3 std before the
# test, as the authors' reference code does (a few early or extreme distances would decide it).
PRADA_MIN_PER_CLASS, PRADA_OUTLIER_STD = 10, 3.0


# The key would have to be served beside the model, and policy.safetensors is a downloadable artifact.
KEYED_NOT_SERVED = (
    "keyed answers (policy.keyed_fraction > 0) are measured by the audit and the benchmark; "
    "the service does not serve them"
)


class PolicyConfig(BaseModel):
    """How a teacher is served beyond the output mode: snapping, an off-manifold detector, an action."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    snap: bool = Field(
        False,
        description="answer every query with the centroid (mean teacher probabilities on the owner's "
        "training data) of its predicted class: the answer then carries the label and nothing else",
    )
    detector: Literal["none", "confidence", "energy", "cluster_kl", "prada"] = Field(
        "none",
        description="off-manifold score: confidence = 1 - max p; energy = -logsumexp(z); cluster_kl = "
        "KL(p || centroid of the predicted class); prada = Juuti et al. 2019 over one key's query "
        "history (Shapiro-Wilk on min L2 distances to earlier same-class queries; the key stays "
        "flagged once W < prada_delta)",
    )
    fpr: float = Field(
        0.01, gt=0, lt=1, description="per-query detectors: share of clean calibration queries flagged"
    )
    prada_delta: float = Field(0.9, gt=0, le=1, description="prada: a key is flagged once W < this")
    prada_min_history: int = Field(
        100, ge=3, le=1_000_000, description="prada: distances needed before the first Shapiro-Wilk test"
    )
    prada_memory: int = Field(
        5000,
        ge=3,
        le=1_000_000,
        description="prada: a key keeps its newest `prada_memory` distances for the test and as many "
        "growing-set inputs, split evenly over the classes (bounds memory and time per key; the "
        "paper's sets are unbounded)",
    )
    action: Literal["refuse", "label", "snap", "perturb"] = Field(
        "refuse",
        description="what a suspicious query gets: refuse (an all-zero row), label (one-hot), snap (the "
        "class centroid), perturb (log-space Gaussian noise of perturb_scale, renormalised, argmax kept)",
    )
    perturb_scale: float = Field(1.0, gt=0, le=100, description="perturb: std of the noise added to log p")
    keyed_fraction: float = Field(
        0.0,
        ge=0,
        le=0.2,
        description="keyed answers (evidence of theft, ml.evidence.keyed): this share of clean inputs, in a "
        "slab of input space drawn from the job's secret, is answered with a secretly shifted label; 0: off",
    )

    def words(self) -> list[str]:
        """What the policy adds to the output mode, as a user would say it (empty: nothing)."""
        parts = ["snapped to class centroids"] if self.snap else []
        if self.detector != "none":
            parts.append(f"{self.detector} detector -> {self.action}")
        if self.keyed_fraction:
            parts.append(f"keyed answers on {self.keyed_fraction:.0%} of inputs")
        return parts

    @model_validator(mode="after")
    def _memory(self) -> PolicyConfig:
        if self.prada_memory < self.prada_min_history:
            raise ValueError("prada_memory must be >= prada_min_history")
        return self


def l2_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) Euclidean distances ||a_i - b_j||, via |a|^2 + |b|^2 - 2 a.b in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


@dataclass
class QueryHistory:
    """One key's PRADA state: per-class growing sets and thresholds, and the min distances D it tests.

    Kept in NumPy on the CPU whatever the model's device: the work per batch is small and sequential
    (a few thousand distances), where a stream of tiny torch kernels costs more than the arithmetic.
    """

    memory: int = 5000  # distances tested, newest first
    set_cap: int = 500  # growing-set members kept per class, newest first
    sets: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (n, D) float32 flattened inputs
    set_dists: dict[int, list[float]] = field(default_factory=dict)  # min distance of each when it joined
    thresholds: dict[int, float] = field(default_factory=dict)
    dists: list[float] = field(default_factory=list)  # D: min distance of every non-first query
    dist_classes: list[int] = field(default_factory=list)
    queries: int = 0
    w: float | None = None  # the latest Shapiro-Wilk statistic
    flagged: bool = False

    def update(self, x: Tensor, pred: Tensor, min_history: int, delta: float) -> None:
        """Add a batch (in order) to the history, then test D once; a flagged key stays flagged."""
        self.queries += len(x)
        if self.flagged:  # nothing left to decide for this key
            return
        flat = x.detach().reshape(len(x), -1).float().cpu().numpy()
        pred_np = pred.cpu().numpy()
        for c in np.unique(pred_np).tolist():
            self._add_class(c, flat[pred_np == c])
        self._test(min_history, delta)

    def _add_class(self, c: int, xc: np.ndarray) -> None:
        """Juuti et al. Alg. 1 for one class's queries of a batch, sequentially, in batch order."""
        old = self.sets.get(c)
        to_set = l2_distances(xc, old).min(1).tolist() if old is not None else [math.inf] * len(xc)
        within = l2_distances(xc, xc).tolist()  # distances to this batch's earlier queries
        gdists, thr = self.set_dists.setdefault(c, []), self.thresholds.get(c, 0.0)
        added: list[int] = []
        for j, d_set in enumerate(to_set):
            d = min([d_set] + [within[j][k] for k in added])
            if math.isinf(d):  # the class's first query founds its growing set
                added.append(j)
                gdists.append(0.0)
                continue
            self.dists.append(d)
            self.dist_classes.append(c)
            if d > thr:
                added.append(j)
                gdists.append(d)
                thr = max(thr, float(np.mean(gdists) - np.std(gdists)))
        self.thresholds[c] = thr
        kept = xc[added] if old is None else np.concatenate([old, xc[added]])
        self.sets[c] = kept[-self.set_cap :]
        del gdists[: -self.set_cap]
        del self.dists[: -self.memory], self.dist_classes[: -self.memory]

    def _test(self, min_history: int, delta: float) -> None:
        d, cls = np.asarray(self.dists), np.asarray(self.dist_classes, dtype=np.int64)
        if len(d) < min_history:
            return
        d = d[np.bincount(cls)[cls] >= PRADA_MIN_PER_CLASS]
        if len(d) == 0 or d.std() == 0:  # identical repeats teach an attacker nothing new
            return
        d = d[np.abs(d - d.mean()) <= PRADA_OUTLIER_STD * d.std()]
        if len(d) < min_history:
            return
        with warnings.catch_warnings():  # scipy warns that p-values are approximate above 5000; W is fine
            warnings.simplefilter("ignore")
            self.w = float(stats.shapiro(d).statistic)
        self.flagged = self.w < delta


@dataclass
class FittedPolicy:
    """A policy fitted to one teacher: its class centroids and, for a per-query detector, its threshold.

    centroids[c] = mean teacher probabilities over the fit samples of true class c that the teacher
    also predicts as c. Grouping by the predicted label guarantees argmax(centroids[c]) = c (a mean of
    vectors whose largest entry is c keeps c largest), so snapping never changes a label; requiring
    the true label too keeps mislabelled or ambiguous training samples out of the cluster. A class
    with no such sample gets its one-hot label.
    """

    config: PolicyConfig
    centroids: Tensor  # (C, C)
    threshold: float | None = None  # flag a query when its score > threshold (per-query detectors)
    keyed: KeyedRegion | None = None  # keyed answers: the secret slab and shift (server-side only)

    def to_tensors(self) -> dict[str, Tensor]:
        """Plain CPU tensors to store beside a checkpoint (safetensors); the config goes to JSON."""
        out = {"centroids": self.centroids.detach().float().cpu().contiguous()}
        if self.threshold is not None:
            out["threshold"] = torch.tensor([self.threshold], dtype=torch.float64)
        if self.keyed is not None:
            out |= {k: v.detach().cpu().contiguous() for k, v in self.keyed.to_tensors().items()}
        return out

    @classmethod
    def from_tensors(cls, config: PolicyConfig, tensors: dict[str, Tensor]) -> FittedPolicy:
        """Rebuild a fitted policy from `to_tensors` output and its config; checks they belong together."""
        centroids = tensors["centroids"].float()
        if centroids.dim() != 2 or centroids.shape[0] != centroids.shape[1]:
            raise ValueError(f"centroids must be (C, C), got {tuple(centroids.shape)}")
        if ("threshold" in tensors) != (config.detector in PER_QUERY_DETECTORS):
            raise ValueError(f"a stored threshold needs a per-query detector, not {config.detector!r}")
        threshold = float(tensors["threshold"].reshape(-1)[0]) if "threshold" in tensors else None
        if ("keyed_params" in tensors) != (config.keyed_fraction > 0):
            raise ValueError(
                "stored keyed answers need keyed_fraction > 0, and keyed_fraction > 0 needs them"
            )
        keyed = KeyedRegion.from_tensors(tensors) if "keyed_params" in tensors else None
        return cls(config, centroids, threshold, keyed)

    def new_history(self) -> QueryHistory:
        """Fresh per-key state (used by prada; harmless for the others)."""
        memory, classes = self.config.prada_memory, len(self.centroids)
        return QueryHistory(memory=memory, set_cap=max(memory // classes, 1))


@dataclass
class Served:
    """What one batch of queries got, and why."""

    answer: Tensor  # (B, C); refused rows are all zero
    refused: Tensor  # (B,) bool
    altered: Tensor  # (B,) bool: answered differently from the plain output mode (refused included)
    score: Tensor  # (B,) detector score, higher = more suspicious; prada: 1 - W of the key; zeros for none


def query_scores(detector: str, probs: Tensor, logits: Tensor, centroids: Tensor) -> Tensor:
    """Per-query off-manifold score (higher = more suspicious) of a per-query detector."""
    if detector == "confidence":  # 1 - max_c p_c
        return 1 - probs.amax(-1)
    if detector == "energy":  # -logsumexp_c z_c
        return -torch.logsumexp(logits, dim=-1)
    if detector == "cluster_kl":  # KL(p || Q_argmax p)
        q = centroids[probs.argmax(-1)]
        return kl_rows(probs, q.clamp_min(torch.finfo(q.dtype).tiny).log())
    raise ValueError(f"{detector!r} is not a per-query detector")


def fit_policy(
    config: PolicyConfig,
    model: nn.Module,
    x_fit: Tensor,
    y_fit: Tensor,
    x_calib: Tensor,
    secret: Secret | None = None,
) -> FittedPolicy:
    """Centroids from (x_fit, y_fit) and the threshold flagging a `fpr` share of x_calib's scores;
    with keyed answers, the slab drawn from `secret` holding a `keyed_fraction` share of x_calib.

    Calibrating on the training inputs the teacher fitted under-estimates the flag rate on real
    traffic (the teacher is more confident there); held-out clean inputs give an honest rate.
    """
    logits = model_logits(model, x_fit)
    probs = torch.softmax(logits, dim=-1)
    num_classes = probs.shape[-1]
    y_fit = y_fit.to(probs.device)
    right = probs.argmax(-1) == y_fit
    centroids, counts = class_centroids(probs[right], y_fit[right], num_classes)
    centroids = torch.where(counts[:, None] > 0, centroids, torch.eye(num_classes))
    threshold = None
    if config.detector in PER_QUERY_DETECTORS:
        calib_logits = model_logits(model, x_calib)
        scores = query_scores(config.detector, torch.softmax(calib_logits, -1), calib_logits, centroids)
        threshold = float(torch.quantile(scores.double(), 1 - config.fpr))
    keyed = None
    if config.keyed_fraction > 0:
        if secret is None:
            raise ValueError("keyed answers need the job's evidence secret")
        keyed = fit_keyed(x_fit, x_calib, config.keyed_fraction, num_classes, secret)
    return FittedPolicy(config, centroids, threshold, keyed)


def perturb(probs: Tensor, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """softmax(log p + scale * N(0, 1)), the new top value swapped into the old argmax (label kept)."""
    noise = torch.randn(probs.shape, generator=generator, dtype=probs.dtype).to(probs.device)
    noisy = torch.softmax(probs.clamp_min(torch.finfo(probs.dtype).tiny).log() + scale * noise, dim=-1)
    old, new = probs.argmax(-1, keepdim=True), noisy.argmax(-1, keepdim=True)
    top, at_old = noisy.gather(-1, new), noisy.gather(-1, old)
    return noisy.scatter(-1, new, at_old).scatter(-1, old, top)


def serve(
    probs: Tensor,
    logits: Tensor,
    mode: OutputMode,
    policy: FittedPolicy | None,
    history: QueryHistory | None = None,
    x: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Served:
    """Serve a batch: detect and act on the raw teacher output, then format with the output mode.

    Pure apart from the history update (prada) and the generator's draws (perturb). Prada updates
    the key's history with the whole batch, then tests once: when the key is flagged, every query of
    that batch is suspicious (a batch of one gives the paper's per-query decision).
    """
    plain = apply_output_mode(probs, mode)
    batch = len(probs)
    no = torch.zeros(batch, dtype=torch.bool, device=probs.device)
    if policy is None:
        return Served(plain, no, no.clone(), torch.zeros(batch, device=probs.device))
    cfg = policy.config
    if policy.keyed is not None:  # the keyed label is the answer: detectors and actions work on it
        if x is None:
            raise ValueError("keyed answers need the queried inputs")
        probs = policy.keyed.answer(probs, x)
    pred = probs.argmax(-1)
    centroids = policy.centroids.to(probs.device, probs.dtype)
    score = torch.zeros(batch, device=probs.device)
    suspicious = no
    if cfg.detector == "prada":
        if history is None or x is None:
            raise ValueError("the prada detector needs the key's history and the queried inputs")
        history.update(x, pred, cfg.prada_min_history, cfg.prada_delta)
        score = score + (0.0 if history.w is None else 1.0 - history.w)
        suspicious = no | history.flagged
    elif cfg.detector != "none":
        score = query_scores(cfg.detector, probs, logits, centroids).float()
        suspicious = score > policy.threshold
    # The action transforms what the query would otherwise get, so it never serves more than that.
    base = centroids[pred] if cfg.snap else probs
    if cfg.action == "label":
        handled = one_hot_argmax(base)
    elif cfg.action == "snap":
        handled = centroids[pred]
    elif cfg.action == "perturb":
        handled = perturb(base, cfg.perturb_scale, generator)
    else:  # refuse: zeroed after formatting (an all-zero row has no top-k or rounding)
        handled = base
    answer = apply_output_mode(torch.where(suspicious[:, None], handled, base), mode)
    refused = suspicious & (cfg.action == "refuse")
    answer = answer.masked_fill(refused[:, None], 0.0)
    altered = refused | (answer != plain).any(-1)
    return Served(answer, refused, altered, score)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE in %: sum_b (n_b / n) |accuracy_b - mean confidence_b| over equal-width confidence bins."""
    if len(probs) == 0:
        return float("nan")
    conf, pred = probs.max(-1)
    right = (pred == labels).double()
    # bin b holds confidences in (b / bins, (b + 1) / bins]; confidence 0 joins the first bin
    which = (conf.double() * bins).ceil().long().clamp(1, bins) - 1
    n = torch.bincount(which, minlength=bins).double()
    gap = torch.bincount(which, right - conf.double(), minlength=bins).abs()
    return float(100.0 * gap.sum() / n.sum())


@torch.no_grad()
def serve_model(
    model: nn.Module,
    x: Tensor,
    mode: OutputMode,
    policy: FittedPolicy | None,
    history: QueryHistory | None = None,
    generator: torch.Generator | None = None,
    logits: Tensor | None = None,
) -> Served:
    """`serve` a batch of inputs through `model` as deployed: eval mode (no dropout, frozen batch-norm
    statistics, even when the model object is shared with code that flips it to train mode), no gradient.

    `logits`, when given, are this model's logits on `x` computed by the caller (the audit shares one
    forward pass among the black boxes that serve the same model differently).
    """
    if model.training:
        model.eval()
    logits = (model(x) if logits is None else logits).float()
    return serve(torch.softmax(logits, dim=-1), logits, mode, policy, history, x, generator)


def honest_cost(
    model: nn.Module,
    mode: OutputMode,
    policy: FittedPolicy | None,
    x_test: Tensor,
    y_test: Tensor,
    *,
    batch_size: int = 1000,
) -> dict[str, float]:
    """What the policy costs honest users on clean inputs sent by ONE key, in order, in batches (percent).

    accuracy: share of ALL queries whose served argmax is right (refused count as wrong); ece: over
    the answered queries, of the served probabilities; refused and altered: shares of all queries.
    The key's history and noise are an `ml.oracle.Oracle`'s with seed 0 and no budget.
    """
    device = next(model.parameters()).device
    history = policy.new_history() if policy is not None else None
    generator = torch.Generator().manual_seed(0)
    served = [
        serve_model(model, x_test[i : i + batch_size].to(device), mode, policy, history, generator)
        for i in range(0, len(x_test), batch_size)
    ]
    answer, y = torch.cat([s.answer.cpu() for s in served]), y_test.cpu()
    refused_mask = torch.cat([s.refused.cpu() for s in served])
    altered = sum(int(s.altered.sum()) for s in served)
    right = (answer.argmax(-1) == y) & ~refused_mask
    n = len(y)
    return {
        "accuracy": 100.0 * float(right.sum()) / n,
        "ece": expected_calibration_error(answer[~refused_mask], y[~refused_mask]),
        "refused": 100.0 * float(refused_mask.sum()) / n,
        "altered": 100.0 * altered / n,
    }
