"""Speed benchmarks: each ratio is measured against its baseline in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ml.models import build_model
from ml.objectives import StepContext, make_objective


def _step_timer(objective_name: str, batch: int, seed: int = 0) -> Callable[[int], float]:
    """A closure that runs n full training steps (forward, loss, backward, AdamW) and returns seconds."""
    torch.manual_seed(seed)
    model = build_model("cnn1d", (1, 40), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = make_objective(objective_name)
    x, y = torch.randn(batch, 1, 40), torch.arange(batch) % 10
    ctx = StepContext(epoch=1.0, epochs=60, num_classes=10)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = sum(objective(model(x), y, ctx).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    return run


def cmim_step_ratio(steps: int = 60, rounds: int = 5, batch: int = 128) -> dict[str, float]:
    """CMIM (default grid, in-batch centroids) step time / CE step time, the benchmark teacher."""
    ce, cmim = _step_timer("ce", batch), _step_timer("cmim", batch)
    ce(10), cmim(10)  # warm-up
    ratios, ce_times, cmim_times = [], [], []
    for r in range(rounds):  # alternate the order so drift hits both sides
        a, b = (ce(steps), cmim(steps)) if r % 2 == 0 else tuple(reversed((cmim(steps), ce(steps))))
        ce_times.append(a / steps)
        cmim_times.append(b / steps)
        ratios.append(b / a)
    return {
        "ce_step_ms": 1000 * statistics.median(ce_times),
        "cmim_step_ms": 1000 * statistics.median(cmim_times),
        "cmim_step_ratio": statistics.median(ratios),
    }


def speed(
    steps: int = 60, rounds: int = 5, students: int = 8, log: Callable[..., Any] = print
) -> dict[str, Any]:
    """Every speed ratio of `cmim bench speed`."""
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    result.update(cmim_step_ratio(steps, rounds))
    log(
        f"CE step {result['ce_step_ms']:.2f} ms, CMIM step {result['cmim_step_ms']:.2f} ms "
        f"(cnn1d, batch 128, 7 temperatures): ratio {result['cmim_step_ratio']:.3f}"
    )
    try:
        from ml.audit import lockstep_ratio
    except ImportError:
        return result
    result.update(lockstep_ratio(students=students, log=log))
    return result
