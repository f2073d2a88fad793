"""Enforcement: what a served model does to the keys an extraction alert names (`ml.monitor`).

A model's owner sets a policy: one action for a key alert (one key's own test crossed its threshold) and
one for a model alert (the test over all keys crossed; it acts on the keys the alert names, the
`suspect_keys`). The actions, weakest first:

- `notify`: nothing but telling the owner;
- `throttle`: the key's rate limit on the model becomes `throttle_fraction` of what it was;
- `probation`: the key may get `probation_queries` more rows from the model, then its budget is spent;
- `suspend`: the key's requests to the model are refused until the owner reinstates it.

Actions only escalate: a key keeps the strongest action any alert gave it (a throttled key put on
probation is both), until the owner reinstates it; a later alert acts again. Pure logic, in memory: the
service (`app.core.enforcement`) decides with `escalate` on the standings its database holds, and keeps
a `StandingBook` of them in every API process for the predict path to read.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["notify", "throttle", "probation", "suspend"]
State = Literal["throttled", "probation", "suspended"]
ACTIONS: tuple[Action, ...] = ("notify", "throttle", "probation", "suspend")
STATE_OF: dict[Action, State | None] = {
    "notify": None,
    "throttle": "throttled",
    "probation": "probation",
    "suspend": "suspended",
}


class EnforcementPolicy(BaseModel):
    """What a served model does when the extraction monitor raises an alert, and its owner's query cap."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"examples": [{"on_key_alert": "suspend", "on_model_alert": "probation"}]},
    )

    on_key_alert: Action = Field(
        "suspend", description="the action on the key a key alert names (its own test crossed its threshold)"
    )
    on_model_alert: Action = Field(
        "suspend",
        description="the action on every key a model alert names (the keys whose near-duplicate queries are "
        "improbable for an honest client)",
    )
    throttle_fraction: float = Field(
        0.1, gt=0, lt=1, description="throttle: the key's rate limit on the model is multiplied by this"
    )
    probation_queries: int = Field(
        100, ge=0, le=2**31 - 1, description="probation: the rows the key may still get from the model"
    )
    owner_query_budget: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="rows all the owner's keys together may get from the model; null = no owner cap "
        "(the per-key budget and the actions above hold a thief with many keys)",
    )

    def action(self, alert_kind: str) -> Action:
        """The action on the keys an alert of this kind ("key" or "model") names."""
        return self.on_key_alert if alert_kind == "key" else self.on_model_alert


@dataclass(frozen=True)
class Standing:
    """What enforcement does to one key on one model now (`alert_id`: the alert that last escalated it)."""

    state: State
    alert_id: str | None
    since: datetime
    rate_fraction: float | None = None  # throttled: the share of its rate limit the key keeps
    budget_limit: int | None = None  # on probation: the rows the key may have got from the model in all

    @property
    def suspended(self) -> bool:
        return self.state == "suspended"

    def rate(self, rate: int) -> int:
        """The key's rate limit (requests per minute) under this standing: at least one."""
        return rate if self.rate_fraction is None else max(1, math.floor(rate * self.rate_fraction))

    def limit(self, limit: int | None) -> int | None:
        """The key's budget on the model under this standing."""
        if self.budget_limit is None:
            return limit
        return self.budget_limit if limit is None else min(limit, self.budget_limit)


RANK: dict[State | None, int] = {None: 0, "throttled": 1, "probation": 2, "suspended": 3}


def escalate(
    current: Standing | None,
    action: Action,
    policy: EnforcementPolicy,
    used: int,
    alert_id: str | None,
    now: datetime,
) -> Standing | None:
    """The key's standing after `action` (`used`: the rows it has had from the model); None when the action
    changes nothing (notify, or a key already held at least as hard)."""
    state = STATE_OF[action]
    if state is None or (current is not None and RANK[current.state] >= RANK[state]):
        return None
    base = current or Standing(state, alert_id, now)
    fraction = policy.throttle_fraction if action == "throttle" else base.rate_fraction
    limit = used + policy.probation_queries if action == "probation" else base.budget_limit
    return replace(
        base, state=state, alert_id=alert_id, since=now, rate_fraction=fraction, budget_limit=limit
    )


def first_exhausted(limits: Sequence[int | None], used: Sequence[int], rows: int) -> int | None:
    """The index of the first budget (None: uncapped) that `rows` more rows would overrun, None when they
    fit in all: a request is answered whole or refused whole (the API's reservation and the benchmark's
    enforced black box both decide with this)."""
    for i, (limit, u) in enumerate(zip(limits, used, strict=True)):
        if limit is not None and u + rows > limit:
            return i
    return None


class StandingBook:
    """The standings of keys per model (a key in good standing has none), safe across threads."""

    def __init__(self) -> None:
        self._items: dict[tuple[Hashable, Hashable], Standing] = {}
        self._lock = threading.Lock()

    def get(self, model: Hashable, key: Hashable) -> Standing | None:
        """The key's standing on the model (a dict lookup: the predict path calls this)."""
        return self._items.get((model, key))

    def put(self, model: Hashable, key: Hashable, standing: Standing | None) -> None:
        """Set the key's standing; None reinstates it."""
        with self._lock:
            if standing is None:
                self._items.pop((model, key), None)
            else:
                self._items[(model, key)] = standing

    def __len__(self) -> int:
        return len(self._items)
