"""What a predict request is charged against: the key's budget on the model (the smaller of the key's and
the model's, cut on probation), the owner's and the global one, the rate limit (cut while throttled), and
how they are described to the caller; a suspended key is refused before anything is charged."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from app.core.config import Settings
from app.core.keys import KeyInfo
from app.core.limits import Cap, Limits, counters_for
from app.problems import Problem
from app.services.serving import ServedModel
from ml.served import (
    EnforcementPolicy,
    Standing,
)


@dataclass(frozen=True)
class Budget:
    """The per-key query budget on one model, and why: the smaller of the key's own and the model's."""

    limit: int | None  # None: unlimited
    source: str  # "key", "model" or "none": whose number applies
    reason: str
    key_budget: int | None
    model_budget: int | None
    model_reason: str


def budget_for(key: KeyInfo, served: ServedModel, operator_budget: int | None) -> Budget:
    """The smaller of the key's own budget and the model's per-key budget (see `ServedModel.model_budget`)."""
    model_limit, model_reason = served.model_budget(operator_budget)
    key_limit = key.query_budget
    if model_limit is not None and (key_limit is None or model_limit < key_limit):
        reason = f"the model's per-key budget, {model_reason}"
        return Budget(model_limit, "model", reason, key_limit, model_limit, model_reason)
    if key_limit is not None:
        why = "the key's own budget" + ("" if model_limit is None else ", smaller than the model's")
        return Budget(key_limit, "key", why, key_limit, model_limit, model_reason)
    return Budget(None, "none", "neither the key nor the model has a query budget", None, None, model_reason)


def caps_for(
    key: KeyInfo,
    served: ServedModel,
    settings: Settings,
    policy: EnforcementPolicy,
    standing: Standing | None = None,
) -> list[Cap]:
    """What a request's rows count against: the key's budget on this model (cut while the key is on
    probation), the owner's (the model's enforcement policy's, else the operator's), the global one."""
    budget = budget_for(key, served, settings.model_query_budget)
    key_cap: tuple[int | None, str] = (budget.limit, budget.reason)
    if standing is not None and standing.budget_limit is not None:
        key_cap = (
            standing.limit(budget.limit),
            f"probation after extraction alert {standing.alert_id} (the model's enforcement policy), "
            f"at most {standing.budget_limit} rows in all; before it, {budget.reason}",
        )
    owner: tuple[int | None, str]
    if policy.owner_query_budget is not None:
        owner = (
            policy.owner_query_budget,
            "the owner's cap over all its keys on this model, set in the model's enforcement policy",
        )
    elif settings.owner_query_budget is not None:
        owner = (
            settings.owner_query_budget,
            "the owner's budget per model, configured by the operator (CMIM_OWNER_QUERY_BUDGET)",
        )
    else:
        owner = (
            None,
            "none: neither the model's enforcement policy nor the operator (CMIM_OWNER_QUERY_BUDGET) sets "
            "an owner cap; the per-key budget holds each key, the enforcement policy a thief with many keys",
        )
    glob = settings.global_query_budget
    glob_reason = (
        "the model's global budget over every key, configured by the operator (CMIM_GLOBAL_QUERY_BUDGET)"
        if glob is not None
        else "none configured (CMIM_GLOBAL_QUERY_BUDGET)"
    )
    k, o, g = counters_for(key.id, key.owner_id, served.model_id)
    return [Cap(k, *key_cap), Cap(o, *owner), Cap(g, glob, glob_reason)]


def describe_budget(budget: Budget, caps: list[Cap], used: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """The budgets that apply to a key on a model, as `GET /v2/models/{id}` reports them."""

    def cap(c: Cap, u: int) -> dict[str, Any]:
        left = None if c.limit is None else max(c.limit - u, 0)
        return {"limit": c.limit, "used": u, "remaining": left, "reason": c.reason}

    key = cap(caps[0], used[0])
    return key | {
        "applies": budget.source,
        "key_budget": budget.key_budget,
        "model_budget": budget.model_budget,
        "model_budget_reason": budget.model_reason,
        "counted": "rows sent by this key to this model; the owner's and the global budget count rows "
        "to this model over all the owner's keys and over every key; a request is answered only if its "
        "rows fit in all three, and budgets do not reset",
        "owner": cap(caps[1], used[1]),
        "global": cap(caps[2], used[2]),
    }


def describe_standing(standing: Standing | None) -> dict[str, Any]:
    """The key's standing on a model, as `GET /v2/models/{id}` reports it (docs/enforcement.md)."""
    if standing is None:
        return {"state": "good"}
    return {
        "state": standing.state,
        "alert_id": standing.alert_id,
        "since": standing.since.isoformat(),
        "rate_fraction": standing.rate_fraction,
        "budget_limit": standing.budget_limit,
    }


SCOPE_NAMES = {
    "key": "this key's budget on this model",
    "owner": "the owner's budget on this model (all the owner's keys together)",
    "global": "the model's global budget (every key together)",
}


def refuse_suspended(model_id: uuid.UUID, standing: Standing | None) -> None:
    """403 of its own type when the key is suspended on the model, naming the alert."""
    if standing is None or not standing.suspended:
        return
    raise Problem(
        403,
        f"this key is suspended on model {model_id} after extraction alert {standing.alert_id} (its "
        "queries looked like a copy being made); the model's owner can reinstate it",
        slug="key-suspended",
        title="Key suspended",
        alert_id=standing.alert_id,
        suspended_at=standing.since.isoformat(),
    )


async def charge(
    limits: Limits,
    key: KeyInfo,
    caps: list[Cap],
    rows: int,
    default_rate: int,
    budget: Budget,
    standing: Standing | None = None,
) -> dict[str, str]:
    """Count one request against the key's rate limit (cut while the key is throttled) and reserve its rows
    on every cap, atomically; returns the headers to send. 429 saying which limit or budget ran out."""
    own = key.rate_limit_per_minute or default_rate
    rate = own if standing is None else standing.rate(own)
    got = await limits.admit(key.id, rate, caps, rows)
    headers = {
        "X-RateLimit-Limit": str(rate),
        "X-RateLimit-Remaining": str(got.rate_remaining),
        "X-RateLimit-Reset": str(got.rate_reset),
    }
    if not got.rate_ok:
        throttled = ""
        if standing is not None and rate != own:
            throttled = f" (throttled from {own} after extraction alert {standing.alert_id})"
        raise Problem(
            429,
            f"rate limit of {rate} requests per minute{throttled} reached; a slot frees in "
            f"{got.rate_reset} s",
            slug="rate-limited",
            headers=headers | {"Retry-After": str(got.rate_reset)},
            limit={"scope": "rate", "limit": rate, "window_seconds": 60, "resets_in_seconds": got.rate_reset},
        )
    capped = [(c, u) for c, u in zip(caps, got.used, strict=True) if c.limit is not None]
    if capped:
        # The headers name the cap closest to running out (the key's on a tie).
        c, u = min(capped, key=lambda cu: cu[0].limit - cu[1])  # type: ignore[operator]
        source = budget.source if c.counter.scope == "key" else c.counter.scope
        if c.counter.scope == "key" and standing is not None and standing.budget_limit is not None:
            source = "probation"
        assert c.limit is not None
        headers |= {
            "X-Query-Budget-Limit": str(c.limit),
            "X-Query-Budget-Remaining": str(max(c.limit - u, 0)),
            "X-Query-Budget-Source": source,
        }
    if got.exhausted is not None:
        c, u = caps[got.exhausted], got.used[got.exhausted]
        raise Problem(
            429,
            f"query budget exhausted: {SCOPE_NAMES[c.counter.scope]}, {c.reason}: {u} of {c.limit} "
            f"rows used, this request needs {rows}; it does not reset",
            slug="query-budget-exhausted",
            headers=headers,
            budget={
                "scope": c.counter.scope,
                "limit": c.limit,
                "used": u,
                "requested": rows,
                "reason": c.reason,
                "resets": None,
            },
        )
    return headers
