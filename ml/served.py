"""What a model is served through, as one entry point for the service: the published serving spec
(`ServedSpec`: output mode, serving policy, the audit's safe budgets, enforcement) and the serving-time
pieces it names (the output modes, the fitted policy, the extraction monitor, the enforcement policy).

Publishing stores `served_spec(job_spec, report)` as the job's `serving.json` artifact; the predict path
reads that artifact and never the job's request spec. `app/` imports what it serves from here only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ml.audit.config import DEFAULT_BUDGET_PASSES
from ml.enforcement import (
    ACTIONS,
    Action,
    EnforcementPolicy,
    Standing,
    StandingBook,
    escalate,
    first_exhausted,
)
from ml.monitor import Alert, ModelMonitor, QueryBank, Reference, suspect_keys
from ml.oracle import OutputMode
from ml.policy import KEYED_NOT_SERVED, FittedPolicy, PolicyConfig, QueryHistory, Served, serve

SERVED_SPEC_VERSION = 1


class ServedSpec(BaseModel):
    """Everything a published model is served through besides its weights (stored as `serving.json`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(SERVED_SPEC_VERSION, description="the format of this spec")
    output_mode: OutputMode = Field(default_factory=OutputMode, description="how answers are formatted")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="the audited serving policy")
    safe_budget: dict[str, int] | None = Field(
        None,
        description="per audited student, the largest tested per-key query budget at which no knockoff "
        "beat label smoothing; None when the audit ran no query budgets",
    )
    budget_curve: str | None = Field(
        None, description="which budgets the audit tested and where they came from, in words"
    )
    enforcement: EnforcementPolicy = Field(
        default_factory=EnforcementPolicy,
        description="what alerts do to keys as the job's spec set it; the owner's later change wins",
    )


def _as_dict(report: Any) -> dict[str, Any]:
    """A report as its JSON dict, whether stored JSON or a typed result (`model_dump`)."""
    if isinstance(report, dict):
        return report
    return report.model_dump(mode="json")


def budget_curve(audit_spec: dict[str, Any], report: Any) -> str | None:
    """The query budgets an audit tested and where they came from: the job's own `audit.query_budgets`, or
    (null, the default) the curve of passes over the attacker's labelled set; None when it tested none."""
    threat = _as_dict(report).get("threat_model") or {}
    tested = threat.get("query_budgets") or []
    if not tested:
        return None
    listed = ", ".join(f"{b:,}" for b in tested)
    if audit_spec.get("query_budgets") is not None:
        return f"tested budgets {listed}, the job's audit.query_budgets"
    passes = ", ".join(str(p) for p in DEFAULT_BUDGET_PASSES)
    return (
        f"tested budgets {listed}: the job's audit.query_budgets was null, which audits the default curve "
        f"of {passes} passes over the attacker's {threat.get('labelled_samples', 0):,} labelled samples; "
        "[] audits none"
    )


def spec_enforcement(job_spec: dict[str, Any]) -> EnforcementPolicy:
    """The enforcement policy a job's spec sets (`serving.enforcement`), else the default."""
    return EnforcementPolicy.model_validate((job_spec.get("serving") or {}).get("enforcement") or {})


def served_spec(job_spec: dict[str, Any], report: Any) -> ServedSpec:
    """What a job's model is served through, from the job's (validated) spec and its audit report."""
    audit = job_spec.get("audit") or {}
    safe = (_as_dict(report).get("safe_budget") or {}).get("teacher")
    return ServedSpec(
        output_mode=OutputMode.model_validate(audit.get("output_mode") or {}),
        policy=PolicyConfig.model_validate(audit.get("policy") or {}),
        safe_budget=None if safe is None else {str(k): int(v) for k, v in safe.items()},
        budget_curve=budget_curve(audit, report),
        enforcement=spec_enforcement(job_spec),
    )


__all__ = [
    "ACTIONS", "KEYED_NOT_SERVED", "SERVED_SPEC_VERSION", "Action", "Alert", "EnforcementPolicy",
    "FittedPolicy", "ModelMonitor", "OutputMode", "PolicyConfig", "QueryBank", "QueryHistory", "Reference",
    "Served", "ServedSpec", "Standing", "StandingBook", "budget_curve", "escalate", "first_exhausted",
    "serve", "served_spec", "spec_enforcement", "suspect_keys",
]  # fmt: skip
