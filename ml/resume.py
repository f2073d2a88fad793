"""A long benchmark run's finished pieces, kept in a folder, so that a run stopped part-way (the end of a
session, a crash, Ctrl-C) continues where it stopped when it is started again with the same folder.

Kept are the teachers (zoo checkpoints: a continued run audits the very same weights, whatever the
machine), the audit's tasks (`ml.audit.tasks.DirectoryResults`, named by the plan's fingerprint as first
recorded here), the monitor's replay and the enforced phase's simulations and students
(`ml.enforced_sim`). Every piece is named by a hash of what it depends on, so a piece of another
configuration, data set or teacher is never read: it is computed anew beside it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ml.audit.tasks import AuditPlan, DirectoryResults, identity
from ml.checkpoint import WEIGHTS_NAME, ModelMeta, load_checkpoint, save_checkpoint


def digest(*parts: Any) -> str:
    """A short hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def weights_digest(models: Iterable[nn.Module]) -> str:
    """A hash of the models' weights (names and bytes)."""
    h = hashlib.sha256()
    for m in models:
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


class Kept:
    """The finished pieces of a run, in `folder`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def tasks(self) -> DirectoryResults:
        return DirectoryResults(self.folder / "tasks")

    def fingerprint(self, plan: AuditPlan) -> str:
        """The name `plan`'s kept tasks go by: the fingerprint this folder recorded for the first plan given
        the same things (`identity`); `plan`'s own, recorded now, when there was none. So the tasks made on
        a CPU that rounds otherwise, or at another thread count, are read back, not trained again."""
        return str(
            self.made("plans", identity(plan), lambda: {"fingerprint": plan.fingerprint})["fingerprint"]
        )

    def _teacher(self, name: str, recipe: str) -> Path:
        return self.folder / "teachers" / f"{name}-{digest(recipe)}"

    def teacher(self, name: str, recipe: str) -> tuple[nn.Module, float] | None:
        """The teacher trained by `recipe` (its training config as JSON) and its last test accuracy, when
        kept; None otherwise."""
        path = self._teacher(name, recipe) / WEIGHTS_NAME
        if not path.exists():
            return None
        model, meta = load_checkpoint(path)
        return model, float(meta.metrics["last_acc"])

    def keep_teacher(self, name: str, recipe: str, model: nn.Module, meta: ModelMeta, acc: float) -> None:
        meta = meta.model_copy(update={"metrics": {**meta.metrics, "last_acc": acc}})
        save_checkpoint(model, meta, self._teacher(name, recipe))

    def _piece(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key}.json"

    def piece(self, kind: str, key: str) -> Any | None:
        """A kept JSON piece of `kind` under `key` (a `digest`), or None."""
        path = self._piece(kind, key)
        return json.loads(path.read_text()) if path.exists() else None

    def made(self, kind: str, key: str, make: Callable[[], Any]) -> Any:
        """The piece of `kind` kept under `key`; when there is none, `make()`'s, kept now (and read back as
        JSON, as a continued run will read it)."""
        if self.piece(kind, key) is None:
            self.keep(kind, key, make())
        return self.piece(kind, key)

    def keep(self, kind: str, key: str, value: Any) -> None:
        path = self._piece(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)  # atomic: a continued run never reads half a piece


def keeping(kept: Kept | None, kind: str, key: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), kept in `kept` under `key` as soon as it returns, in the process that ran it (a pool
    that yields in order keeps each piece as it is done, not when those before it are)."""
    out = fn(*args)
    if kept is not None:
        kept.keep(kind, key, out)
    return out
