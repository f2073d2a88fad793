"""Bodies of what a model's owner is told about extraction and does about it: the monitor's alerts, the
enforcement policy, the review list and action log, and owner webhooks."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.services.schemas import PrintableText
from ml.served import Action, EnforcementPolicy


class AlertKey(BaseModel):
    key_id: str = Field(description="the API key's id")
    statistic: float = Field(description="the key's CUSUM statistic (log-likelihood ratio) at the alert")
    queries: int = Field(description="rows this key sent to the model while monitored, repeats not counted")
    hits: int = Field(description="of those, near-duplicates of recent queries")
    p_value: float | None = Field(
        None, description="model alerts: P(X >= hits) for an honest key (binomial at the honest hit rate)"
    )


class AlertOut(BaseModel):
    id: uuid.UUID
    model_id: uuid.UUID
    kind: str = Field(
        description="key: one key's test crossed its threshold; model: the test over all keys did"
    )
    statistic: float = Field(description="the CUSUM statistic that crossed the threshold")
    threshold: float
    queries: int = Field(description="queries the model's monitor had seen when the alert fired")
    keys: list[AlertKey] = Field(description="the keys involved, most suspicious first")
    created_at: datetime


class AlertList(BaseModel):
    items: list[AlertOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


# --- enforcement: policies, the review list, the action log (app/api/routes/enforcement.py) ---


class EnforcementPatch(BaseModel):
    """Some fields of a model's enforcement policy; the others keep their values."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"on_model_alert": "throttle", "throttle_fraction": 0.2}]},
    )

    on_key_alert: Action | None = None
    on_model_alert: Action | None = None
    throttle_fraction: float | None = None
    probation_queries: int | None = None
    owner_query_budget: int | None = Field(None, description="null here leaves it; PUT sets it to null")


class EnforcementOut(BaseModel):
    model_id: uuid.UUID
    policy: EnforcementPolicy
    source: Literal["owner", "job"] = Field(
        description="owner: set through this API or the dashboard; job: the job's serving.enforcement (or "
        "the default)"
    )
    updated_at: datetime | None = Field(description="when the owner last set it; null: never")


class StandingOut(BaseModel):
    """A key the model holds: throttled, on probation or suspended, until the owner reinstates it."""

    key_id: uuid.UUID
    key_name: str
    key_prefix: str
    key_revoked: bool
    state: Literal["throttled", "probation", "suspended"]
    alert_id: uuid.UUID | None = Field(description="the alert that last escalated it")
    since: datetime
    rate_fraction: float | None = Field(description="throttled: the share of its rate limit it keeps")
    budget_limit: int | None = Field(description="on probation: the rows it may get from the model in all")
    reviewed_at: datetime | None = Field(description="when the owner last chose to keep it held")


class StandingList(BaseModel):
    items: list[StandingOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class Review(BaseModel):
    """The owner's decision on a key the model holds."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"decision": "reinstate"}]})

    decision: Literal["reinstate", "keep", "revoke"] = Field(
        description="reinstate: it answers as before; keep: it stays held (the review is logged); revoke: "
        "the key is revoked for every model"
    )


class ActionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    model_id: uuid.UUID
    key_id: uuid.UUID
    action: Literal["notify", "throttle", "probation", "suspend", "reinstate", "keep", "revoke"]
    alert_id: uuid.UUID | None
    actor: Literal["monitor", "owner"] = Field(description="who acted: the monitor's alert, or the owner")
    actor_key_id: uuid.UUID | None = Field(description="the owner's key that acted; null for the monitor")
    detail: dict[str, Any] = Field(description="the key's standing after the action, and its limits")
    created_at: datetime


class ActionList(BaseModel):
    items: list[ActionOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


# --- owner webhooks (app/api/routes/webhooks.py) ---


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"url": "https://example.org/cmim-hook", "description": "ops"}]},
    )

    url: PrintableText = Field(
        max_length=2000, description="where deliveries are POSTed: an http(s) URL on a public address"
    )
    description: PrintableText = Field("", max_length=200)


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    description: str
    created_at: datetime
    deleted_at: datetime | None


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="the signing secret, shown once: verify each delivery's X-Cmim-Signature with it"
    )


class WebhookList(BaseModel):
    items: list[WebhookOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class DeliveryAttempt(BaseModel):
    at: datetime
    status_code: int | None = Field(description="the receiver's HTTP status; null when none came back")
    error: str | None = Field(description="why the attempt failed; null when it was delivered")
    ms: int | None = Field(None, description="how long the attempt took")


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    webhook_id: uuid.UUID
    event: str = Field(description="alert or enforcement")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    log: list[DeliveryAttempt] = Field(description="the attempts, oldest first")
    next_attempt_at: datetime | None = Field(description="pending: when it is tried next")
    payload: dict[str, Any] = Field(description="the body POSTed")
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")
