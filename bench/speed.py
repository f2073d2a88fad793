"""Speed benchmark: CMIM step / CE step and lockstep audit / sequential; same as `cmim bench speed`.

`--heap`: the same two phases in fresh processes, with glibc's default malloc and with the memory of
each step kept for the next (`ml.train.keep_freed_memory`, what audits and training do), alternated.

`--compare`: one seed of the paper benchmark's audit (the unlimited phase's 56 students, and the
4,000-query budget phase's 14 attackers), trained by the audit as it is and by the audit as it was
before its students ran as a chain of batched matmuls (`vmap` over `functional_call` in training and
evaluation, kept here only, as the baseline), alternated in one process so that the machine's load
hits both; prints seconds per epoch, the speed-up per phase and whether both give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

import ml.audit.lockstep as lockstep
from ml.audit.batches import Batch
from ml.audit.groups import EVAL_CHUNK, StackedGroup
from ml.speed import PaperSeed, paper_seed, phase_name, speed
from ml.train import keep_freed_memory


class VmapGroup(StackedGroup):
    """The baseline: every stacked student through vmap of functional_call, evaluated under no_grad."""

    def logits(self, batch: Batch) -> Tensor:
        p, b = self.params, self.buffers
        if len(self.slots) > len(self.runs):
            p = {k: v[self.slot_index] for k, v in p.items()}
            b = {k: v[self.slot_index] for k, v in b.items()}
        views = {v for _, v in self.slots}
        if len(views) == 1:
            return vmap(self._fwd, in_dims=(0, 0, None))(p, b, batch.views[views.pop()])
        return vmap(self._fwd)(p, b, torch.stack([batch.views[v] for _, v in self.slots]))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        preds = []
        for i in range(0, len(x), EVAL_CHUNK):
            logits = vmap(self._fwd, in_dims=(0, 0, None))(self.params, self.buffers, x[i : i + EVAL_CHUNK])
            preds.append(logits.argmax(-1))
        return torch.cat(preds, dim=1)


def timed_phase(seed: PaperSeed, group: type, epochs: int, phase: int | None) -> tuple[float, list[Any]]:
    """Median seconds per epoch after the first, and every run's accuracies and fidelity."""
    lockstep.StackedGroup = group  # type: ignore[misc]
    stamps: list[float] = []
    try:
        runs = seed.train(epochs, phase, on_epoch=lambda e, n: stamps.append(time.perf_counter()))
    finally:
        lockstep.StackedGroup = StackedGroup  # type: ignore[misc]
    per_epoch = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return per_epoch, [(r.name, r.teacher, r.acc, r.fidelity) for r in runs]


def compare(epochs: int, rounds: int) -> dict[str, Any]:
    seed = paper_seed()
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    for phase in (None, 4000):
        name = phase_name(phase)
        times: dict[str, list[float]] = {"before": [], "after": []}
        figures: dict[str, list[Any]] = {}
        for r in range(rounds):  # alternate the order so drift hits both sides
            order = [("before", VmapGroup), ("after", StackedGroup)]
            for label, group in order if r % 2 == 0 else reversed(order):
                s, figures[label] = timed_phase(seed, group, epochs, phase)
                times[label].append(s)
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        students = len(figures["after"])
        out[name] = {
            "students": students,
            "before_s_per_epoch": before,
            "after_s_per_epoch": after,
            "speedup": before / after,
            "after_student_epochs_per_s": students / after,
            "same_figures": figures["before"] == figures["after"],
        }
        print(
            f"{name} ({students} students, {epochs} epochs x {rounds} rounds): before {before:.3f} s/epoch, "
            f"after {after:.3f} s/epoch, speed-up {before / after:.2f}x, "
            f"same figures: {out[name]['same_figures']}",
            flush=True,
        )
    return out


def phase_times(epochs: int) -> dict[str, float]:
    """Median seconds per epoch of one paper seed's unlimited and 4,000-query phases, in this process."""
    seed = paper_seed()
    return {phase_name(p): timed_phase(seed, StackedGroup, epochs, p)[0] for p in (None, 4000)}


def heap(epochs: int, rounds: int) -> dict[str, Any]:
    """phase_times with glibc's default malloc / with freed memory kept, each in a fresh process."""
    times: dict[str, list[dict[str, float]]] = {"default": [], "kept": []}
    for r in range(rounds):  # alternate the order so drift hits both sides
        for mode in ("default", "kept") if r % 2 == 0 else ("kept", "default"):
            cmd = [sys.executable, __file__, "--phase-times", "--epochs", str(epochs)]
            cmd += ["--keep-heap"] if mode == "kept" else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            times[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(mode, times[mode][-1], flush=True)
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "rounds": rounds}
    for phase in times["default"][0]:
        before = statistics.median(t[phase] for t in times["default"])
        after = statistics.median(t[phase] for t in times["kept"])
        out[phase] = {"default_s_per_epoch": before, "kept_s_per_epoch": after, "speedup": before / after}
        print(f"{phase}: default {before:.3f} s/epoch, kept {after:.3f} s/epoch, {before / after:.2f}x")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", action="store_true", help="the audit now against its vmap baseline")
    parser.add_argument("--heap", action="store_true", help="malloc as it is against freed memory kept")
    parser.add_argument("--phase-times", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep-heap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.keep_heap:
        keep_freed_memory()
    if args.phase_times:
        print(json.dumps(phase_times(args.epochs)))
    elif args.heap:
        print(json.dumps(heap(args.epochs, args.rounds)))
    else:
        print(json.dumps(compare(args.epochs, args.rounds) if args.compare else speed()))
