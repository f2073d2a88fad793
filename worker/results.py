"""A job's audit results in the artifact store: one named object per task, the prepared data the tasks share
and the hand-off they were sent with (what the sweep sends the audit again from); and the hand-off itself,
typed: everything the audit's tasks and its chord callback need, on any worker."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.core.storage import ArtifactStore, StoredObject
from ml.audit import PlanSummary, TaskResult
from ml.data import Dataset as Data

# Prepared data up to this size travels to the other workers through the store (the benchmark's mnist1d,
# 4,000 / 10,000: 2.4 MB); larger data (CIFAR-10 as float32: 738 MB) is loaded by each worker from
# where the job loaded it.
HANDOFF_DATA_BYTES = 64 * 1024**2
HANDOFF_NAME = "handoff.json"
FileRef = tuple[str, str, str, str, str, int]  # (name, kind, media type, key, sha256, size) of an artifact


class Handoff(BaseModel):
    """What run_job hands to the audit's tasks and its chord callback (JSON on the broker and in the store).

    The tasks rebuild the plan from the stored models and data; the callback reads only `summary` (what
    the report needs of the models, measured once by run_job), the task results and `files`: it loads no
    model. `job_id`, `worker_id` and `attempt` are the claim every task is fenced on."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    job_id: str
    worker_id: str
    attempt: int
    audit_config: dict[str, Any]  # the AuditConfig as planned (control architecture resolved)
    teacher: tuple[str, str]  # (weights, config) keys of the teacher in the store
    control: tuple[str, str] | None  # the CE control's, None when the audit runs none
    files: list[FileRef]  # published with the report: the teacher, its monitor and serving policy
    extra: dict[str, Any]  # the job's additions to the report (teacher metadata, monitor, fine-tuning)
    tasks: int
    data: bool  # the prepared data is stored beside the results (else each worker loads its own)
    summary: PlanSummary | None = None  # None: handed off by an earlier version (the plan is rebuilt)
    job_spec: dict[str, Any] = Field(default_factory=dict)  # what serving.json is built from

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def published_files(self) -> list[tuple[str, str, str, StoredObject]]:
        return [(n, k, m, StoredObject(key, sha, size)) for n, k, m, key, sha, size in self.files]


class StoreResults:
    """A job's audit task results in the artifact store, one named object per task key, beside the
    prepared data the tasks share (handed to the other workers so that none regenerates it) and the
    hand-off they were sent with."""

    def __init__(self, store: ArtifactStore, job_id: uuid.UUID) -> None:
        self.store, self.prefix = store, f"audit-results/{job_id}"

    def save_data(self, data: Data) -> bool:
        """Keep the prepared data for the other workers; False (nothing kept) above HANDOFF_DATA_BYTES,
        where each worker loads its own copy as the job did."""
        if data.nbytes > HANDOFF_DATA_BYTES:
            return False
        self.store.write_named(f"{self.prefix}/data.pt", data.to_bytes())
        return True

    def load_data(self) -> Data | None:
        raw = self.store.read_named(f"{self.prefix}/data.pt")
        return None if raw is None else Data.from_bytes(raw)

    def save_handoff(self, handoff: Handoff) -> None:
        """Keep the hand-off: the sweep sends the audit again from it if the broker loses its messages."""
        self.store.write_named(f"{self.prefix}/{HANDOFF_NAME}", json.dumps(handoff.to_json()).encode())

    def load_handoff(self) -> dict[str, Any] | None:
        """The stored hand-off as sent (JSON): what the sweep sends again."""
        raw = self.store.read_named(f"{self.prefix}/{HANDOFF_NAME}")
        return None if raw is None else json.loads(raw)

    def load(self, key: str) -> TaskResult | None:
        data = self.store.read_named(f"{self.prefix}/{key}.json")
        return None if data is None else TaskResult.model_validate(json.loads(data))

    def save(self, key: str, result: TaskResult) -> None:
        self.store.write_named(f"{self.prefix}/{key}.json", json.dumps(result.to_json()).encode())

    def clear(self) -> None:
        """Delete the job's results: once the report holds them, or once the job ended without one."""
        self.store.delete_named(self.prefix)
