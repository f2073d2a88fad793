"""The dashboard templates' filters: numbers, times, output modes and policies in words, a model's served
scores."""

from __future__ import annotations

import math
from typing import Any

from jinja2 import Environment

from ml.oracle import OutputMode
from ml.policy import PolicyConfig

SCORES_SHOWN = 10  # a predict answer's highest served scores on the page (a model may have 1,000 classes)


def _pct(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) and math.isfinite(v) else "–"


def _eta(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "–"
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes else f"{s} s"


def _output_mode(mode: dict[str, Any]) -> str:
    """A job's or model's output mode in words ('labels only', 'top-3 probabilities'), not as JSON."""
    return OutputMode.model_validate(mode).words()


def _policy(policy: dict[str, Any] | None) -> str:
    """A served policy in words ('prada detector -> refuse'), 'none' when it adds nothing."""
    return ", ".join(PolicyConfig.model_validate(policy or {}).words()) or "none"


def _served_scores(scores: list[float] | None, names: list[str]) -> list[tuple[str, float]]:
    """A served answer's classes with a score, highest first (at most SCORES_SHOWN): what the key was told."""
    if scores is None:  # a refused query was told nothing
        return []
    ranked = sorted(zip(names, scores, strict=True), key=lambda c: -c[1])
    return [(name, s) for name, s in ranked if s > 0][:SCORES_SHOWN]


def register_filters(env: Environment) -> None:
    env.filters.update(
        pct=_pct, eta=_eta, output_mode=_output_mode, policy_words=_policy, served_scores=_served_scores
    )
