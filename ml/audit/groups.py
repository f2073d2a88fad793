"""Student groups: stacked (one batched computation over stacked parameters) or one module each."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ml.audit.batches import Batch
from ml.audit.students import Run
from ml.cmi import model_logits
from ml.models import Normalize

EVAL_CHUNK = 512


def vmappable(model: nn.Module, runs: list[Run]) -> bool:
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return not has_bn and not any(r.attack is not None and r.attack.needs_features for r in runs)


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def mlp_layers(model: nn.Module) -> list[str] | None:
    """The Linear layers' names of a [Normalize ->] Flatten -> Linear (-> ReLU -> Linear)* net, else None.

    Students of such a net run as a chain of `torch.baddbmm` over their stacked weights: the same
    numbers as vmap over the module (bias and product in one call, ReLU in place), fewer passes
    over memory.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    if leaves and isinstance(leaves[0][1], Normalize):
        leaves = leaves[1:]
    if not leaves or not isinstance(leaves[0][1], nn.Flatten) or leaves[0][1].start_dim != 1:
        return None
    kinds = [type(m) for _, m in leaves[1:]]
    expect = [nn.Linear if i % 2 == 0 else nn.ReLU for i in range(len(kinds))]
    if not kinds or kinds != expect or kinds[-1] is not nn.Linear:
        return None
    if any(m.bias is None for _, m in leaves[1::2]):
        return None
    return [n for n, _ in leaves[1::2]]


class StackedGroup:
    """Students of one architecture trained as one batched computation over stacked parameters."""

    def __init__(self, runs: list[Run], init: nn.Module) -> None:
        self.runs = runs
        copies = [copy.deepcopy(init) for _ in runs]
        self.params, self.buffers = stack_module_state(copies)
        self.base = copy.deepcopy(init).to("meta")
        self.layers = mlp_layers(init)
        norm = [m for m in init.modules() if isinstance(m, Normalize) and m.enabled]
        self.normalize = copy.deepcopy(norm[0]) if norm else None  # the same buffers in every copy
        self.slots = [(i, v) for i, r in enumerate(runs) for v in r.views]  # one forward per (run, view)
        self.slot_index = torch.tensor([i for i, _ in self.slots], device=next(init.parameters()).device)

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def _fwd(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def logits(self, batch: Batch) -> Tensor:
        """(slots, batch, classes): every slot's logits in one batched call."""
        p, b = self.params, self.buffers
        if len(self.slots) > len(self.runs):  # some run needs several views: repeat its weights per slot
            p = {k: v[self.slot_index] for k, v in p.items()}
            b = {k: v[self.slot_index] for k, v in b.items()}
        views = {v for _, v in self.slots}
        shared = (
            len(views) == 1
        )  # every slot sees the same input: broadcast it rather than copy it per student
        x = batch.views[views.pop()] if shared else torch.stack([batch.views[v] for _, v in self.slots])
        if self.layers:
            return self._mlp(p, x, shared=shared)
        return vmap(self._fwd, in_dims=(0, 0, None if shared else 0))(p, b, x)

    def _mlp(self, params: dict[str, Tensor], x: Tensor, *, shared: bool) -> Tensor:
        """(S, n, classes): the stacked MLP on x, (n, ...) shared by every student or (S, n, ...)."""
        assert self.layers is not None
        if self.normalize is not None:  # per channel (axis 1 of each student's input)
            x = self.normalize(x) if shared else self.normalize(x.flatten(0, 1)).view(x.shape)
        h = x.flatten(1).expand(len(params[self.layers[0] + ".weight"]), -1, -1) if shared else x.flatten(2)
        for j, name in enumerate(self.layers):
            h = torch.baddbmm(params[name + ".bias"][:, None], h, params[name + ".weight"].transpose(1, 2))
            if j + 1 < len(self.layers):
                h = h.relu_()
        return h

    def forward(self, batch: Batch) -> list[dict[str, Tensor]]:
        """Per run, its logits on each of its views."""
        logits = self.logits(batch)
        outs: list[dict[str, Tensor]] = [{} for _ in self.runs]
        for s, (i, v) in enumerate(self.slots):
            outs[i][v] = logits[s]
        return outs

    @torch.inference_mode()
    def predict(self, x: Tensor) -> Tensor:
        """(S, N) predicted labels of every student."""
        preds = []
        # chunks whose activations for all students stay in cache: about 2x faster than 2048 on the MLP
        for i in range(0, len(x), EVAL_CHUNK):
            chunk = x[i : i + EVAL_CHUNK]
            if self.layers:
                logits = self._mlp(self.params, chunk, shared=True)
            else:
                logits = vmap(self._fwd, in_dims=(0, 0, None))(self.params, self.buffers, chunk)
            preds.append(logits.argmax(-1))
        return torch.cat(preds, dim=1)


class ModuleGroup:
    """Students that cannot be stacked (BatchNorm, feature hooks): one module each, same batches."""

    def __init__(self, runs: list[Run], init: nn.Module) -> None:
        self.runs = runs
        self.models = [copy.deepcopy(init) for _ in runs]
        self.features: list[Tensor | None] = [None] * len(runs)
        for i, (run, m) in enumerate(zip(runs, self.models, strict=True)):
            if run.attack is not None and run.attack.needs_features:
                last = _last_linear(m)
                run.attack.setup(last.in_features)
                last.register_forward_hook(self._hook(i))

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.features[i] = inputs[0]

        return hook

    def parameters(self) -> list[Tensor]:
        return [p for m in self.models for p in m.parameters()]

    def forward(self, batch: Batch) -> list[dict[str, Tensor]]:
        outs = []
        for i, (run, m) in enumerate(zip(self.runs, self.models, strict=True)):
            m.train()
            out = {v: m(batch.views[v]) for v in run.views if v != "plain"}
            out["plain"] = m(batch.views["plain"])  # last, so the hooked features are the plain view's
            if self.features[i] is not None:
                out["features"] = self.features[i]
            outs.append(out)
        return outs

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return torch.stack([model_logits(m, x).argmax(-1).to(x.device) for m in self.models])
