"""A job's audit results in the artifact store: one named object per task, the prepared data the tasks share
and the hand-off they were sent with (what the sweep sends the audit again from)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from app.core.storage import ArtifactStore
from ml.audit import TaskResult
from ml.data import Dataset as Data

Handoff = dict[str, Any]  # JSON: what every audit task of a job needs to find its inputs on any worker
# Prepared data up to this size travels to the other workers through the store (the benchmark's mnist1d,
# 4,000 / 10,000: 2.4 MB); larger data (CIFAR-10 as float32: 738 MB) is loaded by each worker from
# where the job loaded it.
HANDOFF_DATA_BYTES = 64 * 1024**2
HANDOFF_NAME = "handoff.json"


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
        self.store.write_named(f"{self.prefix}/{HANDOFF_NAME}", json.dumps(handoff).encode())

    def load_handoff(self) -> Handoff | None:
        raw = self.store.read_named(f"{self.prefix}/{HANDOFF_NAME}")
        return None if raw is None else json.loads(raw)

    def load(self, key: str) -> TaskResult | None:
        data = self.store.read_named(f"{self.prefix}/{key}.json")
        return None if data is None else json.loads(data)

    def save(self, key: str, result: TaskResult) -> None:
        self.store.write_named(f"{self.prefix}/{key}.json", json.dumps(result).encode())

    def clear(self) -> None:
        """Delete the job's results: once the report holds them, or once the job ended without one."""
        self.store.delete_named(self.prefix)
