"""Enforcement in the service: alerts act on keys by their model's policy, and the owner reviews them
(the rules are `ml.enforcement`'s).

The database holds the truth: each model's policy (`enforcement_policies`, else its job's
`serving.enforcement`, else the default), each key's standing (`key_standings`) and the append-only log of
actions (`enforcement_actions`). Every API process keeps the held standings and the owners' policies in
memory, which the predict path reads: no database or network access per request. The process that changes
a standing applies it to its own memory once the change is committed; every other process finds it on its
next `poll` (every CMIM_KEY_POLL_SECONDS, as revocations reach the key cache), so an action holds on every
API replica within a second, embedded and deployed alike.

No FastAPI here: the monitor's flush thread, the API routes, the dashboard and a simulation in process all
call the same `Enforcement`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.keys import REVOKED_LOOKBACK, revoke_api_key
from app.core.limits import Counter, read_usage
from app.core.models import (
    EnforcementAction,
    EnforcementPolicyRow,
    Job,
    KeyStanding,
    MonitorAlert,
    utcnow,
)
from app.core.queue import append_event
from app.core.webhooks import Deliverer, queue_event
from ml.served import EnforcementPolicy, Standing, StandingBook, escalate, spec_enforcement

log = logging.getLogger(__name__)
Decision = Literal["reinstate", "keep", "revoke"]
ACTIVE = "active"  # a reinstated key's row: kept, so that every process sees the change by updated_at


class NotHeld(Exception):
    """The owner reviewed a key the model does not hold (never acted on, or reinstated already)."""


@dataclass
class Outcome:
    """What a transaction changed, applied once it has committed: standings, policies, deliveries to send."""

    standings: list[tuple[uuid.UUID, uuid.UUID, Standing | None, datetime]] = field(default_factory=list)
    policies: list[tuple[uuid.UUID, EnforcementPolicy, datetime]] = field(default_factory=list)
    deliveries: list[uuid.UUID] = field(default_factory=list)
    actions: list[EnforcementAction] = field(default_factory=list)

    def __iadd__(self, other: Outcome) -> Outcome:
        self.standings += other.standings
        self.policies += other.policies
        self.deliveries += other.deliveries
        self.actions += other.actions
        return self


def standing_of(row: KeyStanding | None) -> Standing | None:
    """The standing a row holds (None: a key in good standing)."""
    if row is None or row.state == ACTIVE:
        return None
    return Standing(
        row.state,  # type: ignore[arg-type]
        None if row.alert_id is None else str(row.alert_id),
        row.since,
        row.rate_fraction,
        row.budget_limit,
    )


def spec_policy(spec: dict[str, Any]) -> EnforcementPolicy:
    """The policy a job's spec sets (`serving.enforcement`), else the default."""
    return spec_enforcement(spec)


def policy_of(session: Session, job: Job) -> EnforcementPolicy:
    """The model's policy now: as its owner last set it, else as its job's spec set it."""
    row = session.get(EnforcementPolicyRow, job.id)
    return EnforcementPolicy.model_validate(row.policy) if row else spec_policy(job.spec)


def action_data(a: EnforcementAction) -> dict[str, Any]:
    """An action as events and webhooks tell it."""
    return {
        "action_id": str(a.id),
        "model_id": str(a.model_id),
        "key_id": str(a.key_id),
        "action": a.action,
        "alert_id": None if a.alert_id is None else str(a.alert_id),
        "by": a.actor,
        "actor_key_id": None if a.actor_key_id is None else str(a.actor_key_id),
        "detail": a.detail,
        "created_at": a.created_at.isoformat(),
    }


class Enforcement:
    """Policies and standings: read from memory on the predict path, changed in the database."""

    def __init__(self, sessions: sessionmaker[Session], deliverer: Deliverer) -> None:
        self.sessions, self.deliverer = sessions, deliverer
        self.book = StandingBook()
        self._policies: dict[uuid.UUID, EnforcementPolicy] = {}  # set by owners (the rest: job specs)
        self._versions: dict[tuple[uuid.UUID, uuid.UUID], datetime] = {}  # updated_at last applied
        self._lock = threading.Lock()
        self._loaded = False

    # ---------------------------------------------------------------- the predict path (memory only)

    def standing(self, model_id: uuid.UUID, key_id: uuid.UUID) -> Standing | None:
        """The key's standing on the model in this process (None: good standing)."""
        return self.book.get(model_id, key_id)

    def policy(self, model_id: uuid.UUID, spec: EnforcementPolicy) -> EnforcementPolicy:
        """The model's policy in this process: its owner's, else its job spec's (`spec`)."""
        return self._policies.get(model_id, spec)

    # ---------------------------------------------------------------- keeping this process current

    def _apply(self, model: uuid.UUID, key: uuid.UUID, standing: Standing | None, version: datetime) -> None:
        with self._lock:
            if version < self._versions.get((model, key), version):
                return  # a poll that began before a newer change committed
            self._versions[(model, key)] = version
            self.book.put(model, key, standing)

    def start(self) -> None:
        """Load at start; with the database away, the first poll that reaches it loads instead."""
        try:
            self.load()
        except Exception as e:  # noqa: BLE001 - the app must start: its polls keep trying
            log.warning("enforcement not loaded at start (%s: %s); a poll loads it", type(e).__name__, e)

    def load(self) -> None:
        """Read every held standing and every owner's policy (at start, or after a failed start)."""
        with self.sessions() as session:
            held = session.scalars(select(KeyStanding).where(KeyStanding.state != ACTIVE)).all()
            policies = session.scalars(select(EnforcementPolicyRow)).all()
        for row in held:
            self._apply(row.model_id, row.key_id, standing_of(row), row.updated_at)
        self._policies.update({p.model_id: EnforcementPolicy.model_validate(p.policy) for p in policies})
        self._loaded = True

    def poll(self) -> None:
        """Apply the standings and policies changed lately (one indexed query each)."""
        if not self._loaded:
            self.load()
            return
        since = utcnow() - REVOKED_LOOKBACK
        with self.sessions() as session:
            changed = session.scalars(select(KeyStanding).where(KeyStanding.updated_at >= since)).all()
            policies = session.scalars(
                select(EnforcementPolicyRow).where(EnforcementPolicyRow.updated_at >= since)
            ).all()
        for row in changed:
            self._apply(row.model_id, row.key_id, standing_of(row), row.updated_at)
        self._policies.update({p.model_id: EnforcementPolicy.model_validate(p.policy) for p in policies})

    def committed(self, outcome: Outcome) -> None:
        """After the transaction that made `outcome` committed: hold it here at once, send its webhooks."""
        for model, key, standing, version in outcome.standings:
            self._apply(model, key, standing, version)
        for model, policy, _ in outcome.policies:
            self._policies[model] = policy
        self.deliverer.send(outcome.deliveries)

    # ---------------------------------------------------------------- acting (in the caller's transaction)

    def _held(
        self, session: Session, model: uuid.UUID, keys: list[uuid.UUID]
    ) -> dict[uuid.UUID, KeyStanding]:
        q = select(KeyStanding).where(KeyStanding.model_id == model, KeyStanding.key_id.in_(keys))
        if session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update()  # two replicas acting on one key: the second sees the first's standing
        return {row.key_id: row for row in session.scalars(q)}

    def _log(
        self,
        session: Session,
        out: Outcome,
        model: uuid.UUID,
        owner: uuid.UUID,
        key: uuid.UUID,
        action: str,
        alert: uuid.UUID | None,
        actor_key: uuid.UUID | None,
        detail: dict[str, Any],
    ) -> None:
        row = EnforcementAction(
            model_id=model,
            owner_id=owner,
            key_id=key,
            action=action,
            alert_id=alert,
            actor="monitor" if actor_key is None else "owner",
            actor_key_id=actor_key,
            detail=detail,
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        out.actions.append(row)

    def _tell(self, session: Session, out: Outcome, model: uuid.UUID, owner: uuid.UUID) -> None:
        """The new actions as one job event and one webhook event."""
        if not out.actions:
            return
        data = {"actions": [action_data(a) for a in out.actions]}
        append_event(session, model, "enforcement", data)
        out.deliveries += queue_event(session, owner, "enforcement", data | {"model_id": str(model)})

    def act(self, session: Session, alert: MonitorAlert) -> Outcome:
        """Apply the model's policy to the keys a just-stored alert names, log and tell it (the alert too)."""
        out = Outcome()
        model, owner = alert.model_id, alert.owner_id
        job = session.get_one(Job, model)
        alert_data = {
            "alert_id": str(alert.id),
            "model_id": str(model),
            "kind": alert.kind,
            "statistic": alert.statistic,
            "threshold": alert.threshold,
            "queries": alert.queries,
            "keys": alert.keys,
            "created_at": alert.created_at.isoformat(),
        }
        out.deliveries += queue_event(session, owner, "alert", alert_data)
        policy = policy_of(session, job)
        action = policy.action(alert.kind)
        named = {uuid.UUID(k["key_id"]): int(k["queries"]) for k in alert.keys}
        held = self._held(session, model, list(named))
        used = read_usage(session, [Counter("key", k, model) for k in named])
        now = utcnow()
        for key, queries in named.items():
            row = held.get(key)
            before = standing_of(row)
            had = max(used[Counter("key", key, model)], queries)  # the counters trail by one write-back
            after = escalate(before, action, policy, had, str(alert.id), now)
            if after is None and action != "notify":
                continue  # held at least as hard already
            if after is not None:
                if row is None:
                    row = KeyStanding(model_id=model, key_id=key, owner_id=owner)
                    session.add(row)
                row.state, row.alert_id, row.since = after.state, alert.id, now
                row.rate_fraction, row.budget_limit = after.rate_fraction, after.budget_limit
                row.reviewed_at, row.updated_at = None, now
                out.standings.append((model, key, after, now))
            holds = after or before
            detail: dict[str, Any] = {"alert_kind": alert.kind, "standing": holds.state if holds else ACTIVE}
            if holds is not None and holds.rate_fraction is not None:
                detail["rate_fraction"] = holds.rate_fraction
            if holds is not None and holds.budget_limit is not None:
                detail["budget_limit"] = holds.budget_limit
            self._log(session, out, model, owner, key, action, alert.id, None, detail)
        self._tell(session, out, model, owner)
        return out

    def review(
        self, session: Session, model: Job, key_id: uuid.UUID, decision: Decision, actor_key: uuid.UUID
    ) -> Outcome:
        """The owner's decision on a key the model holds: reinstate it, keep it held, or revoke the key;
        NotHeld when the model holds no such key. The caller commits, then calls `committed`."""
        out = Outcome()
        row = self._held(session, model.id, [key_id]).get(key_id)
        before = standing_of(row)
        if row is None or before is None:
            raise NotHeld(f"key {key_id} is not held on model {model.id}: nothing to review")
        now = utcnow()
        after = ACTIVE if decision == "reinstate" else before.state
        detail: dict[str, Any] = {"standing": after, "was": before.state, "since": before.since.isoformat()}
        if decision == "reinstate":
            row.state, row.rate_fraction, row.budget_limit = ACTIVE, None, None
            out.standings.append((model.id, key_id, None, now))
        elif decision == "revoke":
            revoke_api_key(session, key_id, model.owner_id)
        row.reviewed_at, row.updated_at = now, now
        alert = None if before.alert_id is None else uuid.UUID(before.alert_id)
        self._log(session, out, model.id, model.owner_id, key_id, decision, alert, actor_key, detail)
        self._tell(session, out, model.id, model.owner_id)
        return out

    def set_policy(
        self, session: Session, model: Job, policy: EnforcementPolicy, actor_key: uuid.UUID
    ) -> Outcome:
        """Store the owner's policy for the model (a `policy` event tells it). The caller commits."""
        now = utcnow()
        row = session.get(EnforcementPolicyRow, model.id)
        if row is None:
            row = EnforcementPolicyRow(model_id=model.id, owner_id=model.owner_id)
            session.add(row)
        row.policy, row.updated_at = policy.model_dump(mode="json"), now
        append_event(session, model.id, "policy", {"enforcement": row.policy, "by_key_id": str(actor_key)})
        return Outcome(policies=[(model.id, policy, now)])
