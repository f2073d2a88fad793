"""The predict path, for the API's inference routes and the dashboard's model page alike: the owner's model
(cached, loaded off the event loop on a miss), the key's standing and caps on it (from this process's
memory), the charge, and the answer as audited; plus what a key is told about a model (its metadata)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.enforcement import Enforcement
from app.core.keys import KeyInfo
from app.core.limits import Cap, Limits
from app.core.storage import ArtifactStore
from app.services.budgets import (
    budget_for,
    caps_for,
    charge,
    describe_budget,
    describe_standing,
    refuse_suspended,
)
from app.services.inputs import as_batch
from app.services.monitor import Monitor
from app.services.serving import HistoryCache, ModelCache, ServedModel
from ml.loading import ONNX_ARCH
from ml.served import Served, Standing

# Requests of up to this many rows are answered on the event loop, their forward passes micro-batched
# (`MicroBatcher`); larger ones in a thread, alone (a thread hop costs less than their forward pass).
INLINE_ROWS = 256


@dataclass(frozen=True)
class Predictor:
    """This process's serving state, shared by every request (built once by `app.main.create_app`)."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    models: ModelCache
    histories: HistoryCache
    limits: Limits
    monitor: Monitor
    enforcement: Enforcement

    async def served(self, model_id: uuid.UUID, key: KeyInfo) -> ServedModel:
        """The key's owner's model: 404 when it is not theirs, 409 while not ready."""
        served = self.models.cached(model_id, key.owner_id)
        if served is None:

            def load() -> ServedModel:
                with self.sessions() as session:
                    return self.models.get(session, self.store, model_id, key.owner_id)

            served = await run_in_threadpool(load)
        return served

    def enforced(self, key: KeyInfo, served: ServedModel) -> tuple[Standing | None, list[Cap]]:
        """The key's standing on the model and the caps its rows count against (this process's memory)."""
        standing = self.enforcement.standing(served.model_id, key.id)
        policy = self.enforcement.policy(served.model_id, served.enforcement)
        return standing, caps_for(key, served, self.settings, policy, standing)

    async def answer(
        self, key: KeyInfo, served: ServedModel, x: torch.Tensor
    ) -> tuple[Served, dict[str, str]]:
        """Refuse a suspended key (403), charge the rows (429 when a limit or budget ran out), then answer
        them as audited; returns the answer and the headers that tell the key its limits."""
        standing, caps = self.enforced(key, served)
        refuse_suspended(served.model_id, standing)
        budget = budget_for(key, served, self.settings.model_query_budget)
        rows, rate = int(x.shape[0]), self.settings.rate_limit_per_minute
        headers = await charge(self.limits, key, caps, rows, rate, budget, standing)
        self.monitor.record(served, key.id, x)
        history = self.histories.get(key.id, served)
        if x.shape[0] <= INLINE_ROWS:
            return served.answer(x, await served.batcher.logits(x), history), headers
        return await run_in_threadpool(served.serve, x, history), headers

    async def metadata(self, key: KeyInfo, model_id: uuid.UUID) -> dict[str, Any]:
        """The model's v2 metadata as the key sees it (`GET /v2/models/{id}`, the dashboard's model page)."""
        served = await self.served(model_id, key)
        meta = served.meta
        outputs = [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, meta.num_classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ]
        if served.policy is not None:
            outputs.append({"name": "refused", "datatype": "BOOL", "shape": [-1]})
        return {
            "name": str(model_id),
            "versions": ["1"],
            "platform": "onnxruntime_onnx" if meta.arch == ONNX_ARCH else "pytorch_safetensors",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *meta.input_shape]}],
            "outputs": outputs,
            "parameters": await self.parameters(key, served),
        }

    async def parameters(self, key: KeyInfo, served: ServedModel) -> dict[str, Any]:
        """What the key is told about the model: its serving, its budgets and the key's standing on it."""
        standing, caps = self.enforced(key, served)
        used = await self.limits.usage([c.counter for c in caps])
        budget = budget_for(key, served, self.settings.model_query_budget)
        return {
            "output_mode": served.mode.model_dump(),
            "policy": served_policy(served),
            "query_budget": describe_budget(budget, caps, used),
            "standing": describe_standing(standing),
            "class_names": served.meta.class_names,
            "arch": served.meta.arch,
        }

    async def predict_rows(
        self, key: KeyInfo, model_id: uuid.UUID, inputs: Any
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The simple JSON answer to a batch of inputs, charged to the key, and its headers."""
        served = await self.served(model_id, key)
        x = as_batch(inputs, None, served.meta, self.settings.predict_max_batch, ["body", "inputs"])
        out, headers = await self.answer(key, served, x)
        names = served.meta.class_names
        rows = zip(out.answer.argmax(-1).tolist(), out.answer.tolist(), out.refused.tolist(), strict=True)
        predictions = [
            {"label": None, "class_name": None, "scores": None, "refused": True}
            if refused
            else {"label": y, "class_name": names[y], "scores": s, "refused": False}
            for y, s, refused in rows
        ]
        answer = {
            "model": str(model_id),
            "output_mode": served.mode.model_dump(),
            "policy": served_policy(served),
            "predictions": predictions,
        }
        return answer, headers


def served_policy(served: ServedModel) -> dict[str, Any] | None:
    """The serving policy's config as reported to clients (its fitted threshold stays private)."""
    return None if served.policy is None else served.policy.config.model_dump()
