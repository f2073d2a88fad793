"""Bodies of stored verifications (a remote endpoint's, asked in the background, and every other's)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.api.schemas import Commitment


class VerificationOut(BaseModel):
    id: uuid.UUID
    model: uuid.UUID
    kind: Literal["answers", "model", "endpoint"]
    status: Literal["running", "done", "failed"] = Field(
        description="running (poll again), done (a verdict), failed (could not verify: `result.reason`)"
    )
    suspect: dict[str, Any] = Field(
        description="what was verified; an endpoint's header names only (their values are stored "
        "encrypted and never shown again)"
    )
    result: dict[str, Any] | None = Field(
        description="the verdict (agreement, p_value, alpha, verdict, threshold, null, bounds; for an "
        "endpoint `queries`: rows sent), or {verdict: could_not_verify, reason}"
    )
    requests: int = Field(description="requests logged (an endpoint's, with times and sha256 of both bodies)")
    commitment: Commitment
    created_at: datetime
    finished_at: datetime | None
    bundle: str | None = Field(description="where the evidence bundle of a finished verification is")
