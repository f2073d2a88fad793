"""Where students' batches come from: live queries every epoch, or a budget of cached answers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ml.audit.batches import Batch, make_batch, view_generators
from ml.audit.config import AuditConfig
from ml.audit.students import Run
from ml.data import Dataset
from ml.oracle import Oracle
from ml.train import batches, resolve_device


class LiveSource:
    """Fresh augmented batches every epoch; every teacher queried once per needed view per batch."""

    def __init__(
        self,
        runs: list[Run],
        data: Dataset,
        oracles: dict[str, Oracle],
        cfg: AuditConfig,
        seed: int,
        transfer: Tensor | None = None,
        reshape: Callable[[Batch], Batch] | None = None,
    ) -> None:
        self.data, self.oracles, self.cfg = data, oracles, cfg
        # an attacker that knows a monitor changes its queries before sending them (ml.enforced_sim)
        self.reshape = reshape
        self.transfer = transfer.to(resolve_device(cfg.device)) if transfer is not None else None
        self.transfer_gen = torch.Generator().manual_seed(seed * 3 + 2**20)
        self.transfer_order: list[Tensor] = []
        self.device = resolve_device(cfg.device)
        self.gens = view_generators(seed)
        self.x, self.y = data.x_train.to(self.device), data.y_train.to(self.device)
        self.needed = {v for r in runs for v in r.views}
        self.queried = {t: {v for r in runs if r.teacher == t for v in r.views} for t in oracles}
        self.steps_per_epoch = math.ceil(len(self.x) / cfg.batch_size)

    def epoch(self) -> Iterator[tuple[Batch, dict[str, dict[str, Tensor]]]]:
        for idx in batches(len(self.x), self.cfg.batch_size, self.gens["plain"]):
            idx = idx.to(self.device)
            x, y = self.x[idx], self.y[idx]
            if self.transfer is not None:  # as many unlabelled transfer inputs as labelled ones
                t = self._transfer_batch(len(idx))
                x, y = torch.cat([x, t]), torch.cat([y, torch.full((len(t),), -1, device=y.device)])
            batch = make_batch(self.data, x, y, self.needed, self.cfg, self.gens)
            if self.reshape is not None:
                batch = self.reshape(batch)
            # one forward per model and view, however many black boxes serve that model
            logits: dict[tuple[int, str], Tensor] = {}
            served = {t: {v: self._ask(t, v, batch, logits) for v in vs} for t, vs in self.queried.items()}
            yield batch, served

    def _transfer_batch(self, n: int) -> Tensor:
        """The next n transfer inputs, cycling through the pool in a fresh order each pass."""
        taken: list[Tensor] = []
        while sum(len(t) for t in taken) < n:
            if not self.transfer_order:
                order = torch.randperm(len(self.transfer), generator=self.transfer_gen)
                self.transfer_order = list(order.split(n))
            taken.append(self.transfer_order.pop(0))
        return self.transfer[torch.cat(taken)[:n].to(self.transfer.device)]

    def _ask(self, teacher: str, view: str, batch: Batch, logits: dict[tuple[int, str], Tensor]) -> Tensor:
        """The served answers; a refused query falls back to what the attacker knows itself: its own
        label (the mixed label on a mixup view), the same target the LS students train on."""
        oracle = self.oracles[teacher]
        key = (id(oracle.model), view)
        if key not in logits:
            with torch.no_grad():
                logits[key] = oracle.model.eval()(batch.views[view])
        answer = oracle(batch.views[view], logits[key])
        if oracle.last is None or not bool(oracle.last.refused.any()):
            return answer
        # a refused unlabelled transfer row leaves the attacker nothing: a uniform target
        own = F.one_hot(batch.y.clamp_min(0), answer.shape[-1]).to(answer.dtype)
        own = torch.where(batch.y[:, None] >= 0, own, torch.full_like(own, 1 / answer.shape[-1]))
        if view in batch.mix:
            perm, lam = batch.mix[view]
            lam = lam[:, None].to(answer.dtype)
            own = lam * own + (1 - lam) * own[perm]
        return torch.where(oracle.last.refused[:, None], own, answer)


class CachedSource:
    """An attacker with a query budget: n samples' answers bought once, then replayed as long as it likes."""

    def __init__(self, live: LiveSource, n: int, seed: int) -> None:
        parts: list[tuple[Batch, dict[str, dict[str, Tensor]]]] = []
        got = 0
        while got < n:
            for batch, served in live.epoch():
                parts.append((batch, served))
                got += len(batch.y)
                if got >= n:
                    break
        keep = lambda ts: torch.cat(ts)[:n]  # noqa: E731
        self.y = keep([b.y for b, _ in parts])
        self.views = {v: keep([b.views[v] for b, _ in parts]) for v in parts[0][0].views}
        self.served = {t: {v: keep([s[t][v] for _, s in parts]) for v in vs} for t, vs in parts[0][1].items()}
        self.n, self.batch_size = len(self.y), live.cfg.batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)

    def epoch(self) -> Iterator[tuple[Batch, dict[str, dict[str, Tensor]]]]:
        for idx in batches(self.n, self.batch_size, self.gen):
            idx = idx.to(self.y.device)
            y = self.y[idx]
            batch = Batch(y=y, views={v: x[idx] for v, x in self.views.items()}, labelled=int((y >= 0).sum()))
            yield batch, {t: {v: a[idx] for v, a in vs.items()} for t, vs in self.served.items()}
