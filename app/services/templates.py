"""The templates of every HTML page (the dashboard's, in app/web/templates, and the report page, which the API
and the dashboard both serve): one Jinja2 environment, which escapes every value unless it is marked safe,
and its filters: numbers, times, output modes and policies in words, a model's served scores, text with
`code` spans."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from ml.served import OutputMode, PolicyConfig

SCORES_SHOWN = 10  # a predict answer's highest served scores on the page (a model may have 1,000 classes)


def _num(v: Any, digits: int = 2) -> str:
    """A number with `digits` decimals ('–' when missing or not finite): percentages, p-values, seconds."""
    return f"{v:.{digits}f}" if isinstance(v, int | float) and math.isfinite(v) else "–"


def _code_spans(text: str) -> Markup:
    """Plain text (the findings' sentences), escaped, with its `code` spans shown as code."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


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


# autoescapes .html templates
templates = Jinja2Templates(directory=Path(__file__).parents[1] / "web" / "templates")
templates.env.filters.update(pct=_num, num=_num, code_spans=_code_spans, eta=_eta, output_mode=_output_mode)
templates.env.filters.update(policy_words=_policy, served_scores=_served_scores)
