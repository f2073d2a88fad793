"""A job's audit plan on the worker that runs its tasks: rebuilt once per process from what run_job stored
(the prepared data, the teacher and control, the evidence secret), the same plan on every worker; and the
job's evidence secret and challenge, kept as named objects in the store (never as artifacts).
"""

from __future__ import annotations

import json
import logging
import uuid

from app.core.storage import ArtifactStore
from ml.audit import AuditConfig, AuditPlan, plan
from ml.evidence import DEFAULT_MECHANISM, Secret
from ml.evidence.verify import pack_challenge, selected_names, store_names
from worker.inputs import job_inputs
from worker.lease import JobContext
from worker.models import stored_model
from worker.results import Handoff, StoreResults

log = logging.getLogger(__name__)

_plans: dict[tuple[uuid.UUID, int], AuditPlan] = {}  # this process's last plan: it runs many tasks of a job


def keep_plan(key: tuple[uuid.UUID, int], p: AuditPlan) -> None:
    _plans.clear()
    _plans[key] = p


def audit_plan(ctx: JobContext, store: ArtifactStore, handoff: Handoff) -> AuditPlan:
    """The job's audit plan rebuilt from what run_job stored: the same plan on every worker."""
    key = (ctx.claim.job_id, ctx.claim.attempt)
    if key not in _plans:
        handed = StoreResults(store, ctx.claim.job_id).load_data() if handoff.data else None
        data = handed if handed is not None else job_inputs(ctx, store).data
        source = "the data the job handed over" if handed is not None else "data loaded again"
        log.info("job %s: audit plan rebuilt from %s", ctx.claim.job_id, source)
        teacher = stored_model(store, *handoff.teacher, data)
        control = None if handoff.control is None else stored_model(store, *handoff.control, data)
        cfg, secret = AuditConfig.model_validate(handoff.audit_config), evidence_secret(store, ctx)
        keep_plan(key, plan(cfg, teacher, data, control=control, secret=secret))
    return _plans[key]


def evidence_secret(store: ArtifactStore, ctx: JobContext) -> Secret:
    """The job's evidence secret: made (and committed to) the first time, then read back on every worker
    and attempt. Kept as a named object, never as an artifact: no route serves it."""
    name = store_names(str(ctx.claim.job_id))[0]
    raw = ctx.retrying(lambda: store.read_named(name), "read the evidence secret")
    if raw is not None:
        return Secret.from_json(json.loads(raw))
    secret = Secret.new()
    ctx.retrying(lambda: store.write_named(name, json.dumps(secret.to_json()).encode()), "store the secret")
    return secret


def store_challenge(store: ArtifactStore, ctx: JobContext, p: AuditPlan) -> None:
    """What verification needs besides the report: the default mechanism's challenge for the teacher, and
    the selected mechanism's candidate pool (publishing keeps the points the audit chose from it)."""
    data = pack_challenge(p.challenges[DEFAULT_MECHANISM]["teacher"][0])
    name = store_names(str(ctx.claim.job_id))[1]
    ctx.retrying(lambda: store.write_named(name, data), "store the evidence challenge")
    if (pool := p.challenges.get("selected", {}).get("teacher")) is not None:
        raw, pool_name = pack_challenge(pool[0]), selected_names(str(ctx.claim.job_id))[0]
        ctx.retrying(lambda: store.write_named(pool_name, raw), "store the selected challenge's pool")
