"""Job presets: named, complete jobs (teacher + audit) that explicit fields override.

`quick` is a demo that finishes in minutes on a CPU and is marked indicative (too few seeds and epochs to
discriminate); `standard` is the benchmark's discriminating schedule (`ml.benchmark`, benchmark `mnist1d`).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, Field

from ml.benchmark import BENCHMARKS
from ml.registry import Registry


class Preset(BaseModel):
    """A complete job: its teacher and audit fields, what it is for and how long it takes."""

    name: str
    description: str
    expected_time: str = Field(description="how long the job takes, and on what")
    indicative: bool = Field(description="too small to discriminate: its verdict is an indication only")
    teacher: dict[str, Any]
    audit: dict[str, Any]

    def job(self) -> dict[str, Any]:
        """The preset as a job body's `teacher` and `audit` (a fresh copy)."""
        return copy.deepcopy({"teacher": self.teacher, "audit": self.audit})


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it, nested dicts merged key by key (lists and values replaced)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_preset(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """A job body: the named preset's teacher and audit with `body`'s explicit fields laid over them."""
    job = PRESETS.get(name).job()
    teacher = body.get("teacher")
    if isinstance(teacher, dict):
        job["teacher"] = own_objective(job["teacher"], teacher)
    return merge(job, body)


def own_objective(preset_teacher: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The preset's teacher without its objective's parameters when `given` names another objective:
    they belong to the preset's objective (CE takes none of CMIM's `lam`); `given`'s own stay."""
    if given.get("objective") not in (None, preset_teacher.get("objective")):
        return {k: v for k, v in preset_teacher.items() if k != "objective_params"}
    return preset_teacher


PRESETS: Registry[Preset] = Registry("preset")

PRESETS.register("quick")(
    Preset(
        name="quick",
        description="a demo on MNIST-1D (2,000 training samples): a CMIM cnn1d teacher for 15 epochs and an "
        "audit of 2 seeds x 20 epochs with hard_label and fm; served label-only (the default protection). "
        "Indicative only: too few seeds and epochs for the audit to discriminate",
        expected_time="a few minutes on a 2-core CPU",
        indicative=True,
        teacher={
            "dataset": "mnist1d",
            "dataset_params": {"num_train": 2000, "num_test": 1000},
            "arch": "cnn1d",
            "objective": "cmim",
            "objective_params": {"lam": 3.0},
            "epochs": 15,
            "batch_size": 128,
            "seed": 0,
        },
        audit={
            "students": ["mlp"],
            "attacks": ["hard_label", "fm"],
            "seeds": 2,
            "epochs": 20,
            "ls_eps": [0.0, 0.1],
            "control": True,
            "output_mode": {"kind": "label"},  # served as every job is by default (docs/serving.md)
            "query_budgets": [2000, 10000],
        },
    )
)


def _standard() -> Preset:
    """The benchmark's schedule and seeds (`ml.benchmark`, `mnist1d`), its teacher served label-only."""
    bench = BENCHMARKS.get("mnist1d")
    sizes = bench.dataset_params
    return Preset(
        name="standard",
        description=f"the benchmark's discriminating schedule: MNIST-1D ({sizes['num_train']:,} "
        f"train / {sizes['num_test']:,} test), a CMIM {bench.teacher} teacher for "
        f"{bench.teacher_epochs} epochs, {bench.student} students for {bench.epochs} epochs over "
        f"{bench.seeds} seeds, every attack of the benchmark, the LS sweep and a budget curve; served "
        "label-only (the default protection)",
        # Measured: `cmim audit --preset standard --objective ce --output-mode probs --workers 2` took
        # 2,017 s on a quiet 2-core CPU (teacher and control 2 min; audit tasks in two processes of one
        # thread). One process doing the same task time alone: about an hour (estimated, not measured).
        expected_time="about 35 minutes on a 2-core CPU with two workers (measured), about an hour with "
        "the embedded worker (one process; estimated), minutes on a GPU",
        indicative=False,
        teacher={
            "dataset": bench.dataset,
            "dataset_params": dict(bench.dataset_params),
            "arch": bench.teacher,
            "objective": "cmim",
            "objective_params": dict(bench.cmim_params),
            "epochs": bench.teacher_epochs,
            "seed": 0,
        },
        audit={
            "students": [bench.student],
            "attacks": list(bench.attacks),
            "attack_params": copy.deepcopy(bench.attack_params),
            "seeds": bench.seeds,
            "base_seed": 0,
            "epochs": bench.epochs,
            "ls_eps": list(bench.ls_eps),
            "control": True,
            "output_mode": {"kind": "label"},
            "query_budgets": list(bench.query_budgets),
        },
    )


PRESETS.register("standard")(_standard())


class PresetOptions:
    """A preset's values for the options a command was not given on its command line."""

    def __init__(self, ctx: Any, name: str | None, trains_teacher: bool = True) -> None:  # a typer.Context
        self.ctx = ctx
        self.job = PRESETS.get(name).job() if name else {"teacher": {}, "audit": {}}
        if not trains_teacher:  # a given teacher keeps its own data set and recipe
            self.job["teacher"] = {}

    def pick(self, option: str, value: Any, section: str, field: str) -> Any:
        """The option's value when given on the command line, else the preset's (if any), else its default."""
        preset = self.job[section].get(field)
        source = self.ctx.get_parameter_source(option)
        if preset is None or getattr(source, "name", None) == "COMMANDLINE":  # typer vendors its own click
            return value
        return preset

    def params(self, given: dict[str, Any], section: str, field: str) -> dict[str, Any]:
        """The preset's parameters with the command line's laid over them."""
        return merge(self.job[section].get(field) or {}, given)
