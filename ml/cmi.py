"""Conditional mutual information of a classifier's output clusters, I_T, over temperatures.

    P_i^T = softmax(z_i / T),  Q_y^T = mean of P_i^T over samples of class y,
    I_T   = (1/n) sum_i KL(P_i^T || Q_{y_i}^T)

The metric here is exact (float64, log-space); the training loss with its fused gradient lives
in `ml.objectives`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

DEFAULT_LOG_TEMPERATURES = (1.0, 4.0, 16.0)


def _as_temperatures(temperatures: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    t = torch.as_tensor(temperatures, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 0 or bool((t <= 0).any()):
        raise ValueError("temperatures must be a non-empty list of positive numbers")
    return t


def class_centroids(probs: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean of probs (..., N, C) over samples of each label: (..., num_classes, C), counts."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(probs.dtype)  # (N, Y)
    counts = onehot.sum(0)
    sums = onehot.T @ probs  # broadcasts over leading temperature axes
    return sums / counts.clamp_min(1).unsqueeze(-1), counts


def conditional_mutual_information(
    logits: Tensor, labels: Tensor, temperatures: Sequence[float] | Tensor
) -> Tensor:
    """Exact I_T for each temperature (1-D tensor, same order) over the given samples."""
    z = logits.detach().to(torch.float64)
    t = _as_temperatures(temperatures, z)
    log_p = torch.log_softmax(z.unsqueeze(0) / t[:, None, None], dim=-1)  # (K, N, C)
    p = log_p.exp()
    num_classes = int(labels.max().item()) + 1 if labels.numel() else 1
    q, _ = class_centroids(p, labels, num_classes)  # (K, Y, C)
    log_q = q.log()[:, labels]  # (K, N, C); Q >= P_i / n_y > 0 wherever P_i > 0
    # where P underflows to 0 the term is 0 (0 log 0), even if Q underflowed too
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).mean(-1).clamp_min(0).float()


@torch.no_grad()
def model_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits of a model over a whole split, in eval mode, batched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def split_cmi(
    model: nn.Module, x: Tensor, y: Tensor, temperatures: Sequence[float] = DEFAULT_LOG_TEMPERATURES
) -> dict[str, float]:
    """I_T of a model over a whole split, keyed by the temperature written as text ("1", "0.5")."""
    return cmi_by_temperature(model_logits(model, x), y.cpu(), temperatures)


def cmi_by_temperature(logits: Tensor, labels: Tensor, temperatures: Sequence[float]) -> dict[str, float]:
    """I_T as a dict keyed by the temperature written as text."""
    values = conditional_mutual_information(logits, labels, temperatures)
    return {format_temperature(t): float(v) for t, v in zip(temperatures, values, strict=True)}


def format_temperature(t: float) -> str:
    """Temperature as a stable dictionary key: 1.0 -> "1", 0.5 -> "0.5"."""
    return f"{float(t):g}"
