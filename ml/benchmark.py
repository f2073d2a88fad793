"""`cmim bench paper`: the benchmark that can tell, every protection against every attack.

The discriminating setting of SPEC.md (mnist1d 4k/10k, the 1D CNN teacher, the MLP student, long
schedules, paired seeds: teacher i is attacked by the students of seed i) is a named configuration;
it runs through the same audit code as every job. A protection is a teacher plus the policy that
serves it; all protections are attacked in one lockstep per seed, against the same LS students.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ml.audit import AuditConfig, AuditProgress, AuditReport, BlackBox, run_audit, serve_box
from ml.audit.result import Section, ServedSection, ServedSummary
from ml.charts import Bar, bar_chart, write_svg
from ml.checkpoint import ModelMeta
from ml.data import Dataset, load_dataset
from ml.enforced_sim import KEYS, enforced_markdown, enforced_phase, enforced_summary
from ml.evidence import Secret
from ml.evidence.figures import evidence_markdown, evidence_summary
from ml.monitor import MonitorConfig
from ml.monitor_sim import monitor_markdown, simulate_seeds
from ml.oracle import OutputMode
from ml.policy import PolicyConfig
from ml.pool import pool_map
from ml.registry import Registry
from ml.resume import Kept, digest
from ml.teachers import CONTROL_OBJECTIVE, control_recipe
from ml.train import TrainConfig, train_model


class Protection(BaseModel):
    """A teacher objective plus the output mode and policy it is served with."""

    model_config = ConfigDict(extra="forbid")

    objective: str = "cmim"
    objective_params: dict[str, Any] | None = Field(
        None, description="None: the benchmark's cmim_params for cmim, the defaults otherwise"
    )
    finetune: bool = Field(
        False, description="start from the CE teacher of the same seed and train finetune_epochs"
    )
    output_mode: OutputMode = Field(default_factory=OutputMode)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    def recipe(self, bench: Benchmark) -> tuple[str, dict[str, Any], bool]:
        """(objective, parameters, fine-tuned): protections with the same recipe share their teachers."""
        params = self.objective_params
        if params is None:
            params = bench.cmim_params if self.objective == "cmim" else {}
        return self.objective, params, self.finetune


class Benchmark(BaseModel):
    """A named, reproducible benchmark configuration."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "mnist1d"
    dataset_params: dict[str, Any] = Field(default_factory=lambda: {"num_train": 4000, "num_test": 10000})
    teacher: str = "cnn1d"
    teacher_epochs: int = 60
    finetune_epochs: int = 30
    cmim_params: dict[str, Any] = Field(default_factory=lambda: {"lam": 3.0})
    student: str = "mlp"
    epochs: int = 300
    seeds: int = 5
    # fm_edge and fm_noise are the adaptive attackers: queries built to pass off-manifold detectors
    attacks: list[str] = Field(
        default_factory=lambda: ["kd", "hard_label", "dkd", "fm", "fm_edge", "fm_noise"]
    )
    attack_params: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"kd": {"T": 4}})
    # SPEC's sweep stops at 0.3, where our best LS student sat: 0.4 and 0.5 check the edge
    ls_eps: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    query_budgets: list[int] = Field(default_factory=lambda: [4000, 20000, 100000])
    # the evidence null's other architectures (AuditConfig.null_archs: None, the default families) and
    # how many independent models of each a seed trains
    null_archs: list[str] | None = None
    null_models: int = 1
    # the black boxes attacked under each budget: the safe budget of the default protection and of CE
    budget_for: list[str] = Field(default_factory=lambda: ["control", "protected"])
    # the enforced black box (ml.enforced_sim): this protection at its safe budget behind the serving gate,
    # attacked with K keys each; "" runs none (it needs the protection's budget curve)
    enforced: str = "protected"
    enforced_keys: list[int] = Field(default_factory=lambda: list(KEYS))
    # "ce" (the control, full probabilities) and "cmim" (full probabilities) are always audited;
    # "protected" is the product's default protection.
    protections: dict[str, Protection] = Field(
        default_factory=lambda: {
            "cmim_snap": Protection(policy=PolicyConfig(snap=True)),
            # refusing suspicious queries backfired: the attacker's own mixed labels on refused mixes
            # taught its student more than the teacher's one-hot answers (docs/calibration.md)
            "cmim_label_refuse": Protection(
                output_mode=OutputMode(kind="label"),
                policy=PolicyConfig(detector="energy", fpr=0.01, action="refuse"),
            ),
            # is it the teacher or the serving? the CE teacher served label-only
            "ce_label": Protection(objective="ce", output_mode=OutputMode(kind="label")),
            # the product's default: the best trade-off found, CMIM served label-only
            "protected": Protection(output_mode=OutputMode(kind="label")),
            # evidence of theft at serving time: the default plus keyed answers on 0.5 % of inputs
            "protected_keyed": Protection(
                output_mode=OutputMode(kind="label"), policy=PolicyConfig(keyed_fraction=0.005)
            ),
        }
    )


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")
CONTROL: tuple[str, dict[str, Any], bool] = (CONTROL_OBJECTIVE, {}, False)  # the CE teachers' recipe
# the null also holds CNNs of the teacher's own architecture, 3 per seed of each family: the selected
# challenge is chosen against them on seeds 0, 2, 4 and measured on 6 of each on seeds 1, 3
BENCHMARKS.register("mnist1d")(Benchmark(null_archs=["cnn1d_small", "cnn1d"], null_models=3))
BENCHMARKS.register("mnist1d-quick")(
    Benchmark(
        dataset_params={"num_train": 1000, "num_test": 2000},
        teacher_epochs=15,
        epochs=30,
        seeds=2,
        ls_eps=[0.0, 0.1],
        query_budgets=[1000, 4000],
    )
)

# Evidence of theft at a scale where knockoffs come near the LS student (docs/evidence.md): 3 seeds,
# 2k/4k samples, 80 student epochs; keyed answers on 0.5 % (the cost target) and 2 % of inputs.
BENCHMARKS.register("mnist1d-evidence")(
    Benchmark(
        dataset_params={"num_train": 2000, "num_test": 4000},
        teacher_epochs=30,
        epochs=80,
        seeds=3,
        attacks=["kd", "hard_label", "fm", "fm_edge"],
        ls_eps=[0.0, 0.2, 0.4],
        query_budgets=[],
        budget_for=[],
        protections={
            "protected": Protection(output_mode=OutputMode(kind="label")),
            "protected_keyed": Protection(
                output_mode=OutputMode(kind="label"), policy=PolicyConfig(keyed_fraction=0.005)
            ),
            "protected_keyed_2pct": Protection(
                output_mode=OutputMode(kind="label"), policy=PolicyConfig(keyed_fraction=0.02)
            ),
        },
    )
)


def _fm_comparison(protections: dict[str, Protection]) -> Benchmark:
    """3 seeds, function matching only, no budget curves: teachers compared against fm and the default."""
    default = {"protected": Protection(output_mode=OutputMode(kind="label"))}
    return Benchmark(
        seeds=3,
        attacks=["fm"],
        attack_params={},
        query_budgets=[],
        budget_for=[],
        protections=protections | default,
    )


# Other teachers: does any teacher, served with full probabilities, stop function matching?
BENCHMARKS.register("mnist1d-teachers")(
    _fm_comparison(
        {
            "nasty": Protection(objective="nasty"),
            # the owner's CE teacher fine-tuned with CMIM (lambda 3) for 30 epochs
            "cmim_ft": Protection(finetune=True),
            # CMIM also on uniform mixup inputs, clustered by predicted label
            "cmim_mixed": Protection(objective_params={"lam": 3.0, "mixed": 3.0}),
            "cmim_mixed_label": Protection(
                objective_params={"lam": 3.0, "mixed": 3.0}, output_mode=OutputMode(kind="label")
            ),
        }
    )
)
# CMIM's own knobs: does any setting, served with full probabilities, stop function matching?
BENCHMARKS.register("mnist1d-cmim")(
    _fm_comparison(
        {
            "cmim_lam10": Protection(objective_params={"lam": 10.0}),
            "cmim_uniform": Protection(objective_params={"lam": 3.0, "weights": "uniform"}),
            "cmim_ema_warmup": Protection(
                objective_params={"lam": 3.0, "centroids": "ema", "warmup_epochs": 10}
            ),
        }
    )
)


def run_paper(
    bench: Benchmark,
    *,
    device: str = "auto",
    workers: int = 1,
    log: Callable[[str], None] = print,
    on_progress: Callable[[AuditProgress], None] | None = None,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Train the per-seed teachers, audit every protection in one lockstep, and summarise. With `keep`, a
    folder, every finished teacher, audit task and enforced student is kept there (`ml.resume`): run
    again with the same folder, a stopped run continues where it stopped."""
    t0 = time.perf_counter()
    kept = None if keep is None else Kept(keep)
    data = load_dataset(bench.dataset, **bench.dataset_params)
    teachers = _train_teachers(bench, data, device, workers, log, kept)
    cfg = AuditConfig(
        students=[bench.student],
        attacks=bench.attacks,
        attack_params=bench.attack_params,
        seeds=bench.seeds,
        epochs=bench.epochs,
        ls_eps=bench.ls_eps,
        control=True,
        query_budgets=bench.query_budgets,
        null_archs=bench.null_archs,
        null_models=bench.null_models,
        output_mode=OutputMode(),  # the "ce" and "cmim" rows serve full probabilities; protections differ
        device=device,
    )
    secret = Secret.benchmark(cfg.base_seed)  # the audit's own default: keyed boxes and challenges agree
    boxes: dict[str, BlackBox] = {
        name: serve_box(teachers[_recipe_key(bench, *p.recipe(bench))], p.output_mode, p.policy, data, secret)
        for name, p in bench.protections.items()
    }
    report = run_audit(
        cfg,
        teachers[_recipe_key(bench, "cmim", bench.cmim_params, False)],
        data,
        control=teachers[_recipe_key(bench, *CONTROL)],
        protections=boxes,
        budget_for=bench.budget_for,
        workers=workers,
        on_progress=on_progress,
        results=None if kept is None else kept.tasks,
        named=None if kept is None else kept.fingerprint,
    )
    report["benchmark"] = bench.model_dump(mode="json")
    # the monitor across keys against the unlimited fm_edge attacker of this benchmark (200k queries at most)
    attack = min(bench.epochs * len(data.x_train), 200_000)
    replay = lambda: simulate_seeds(data, bench.seeds, queries=attack)  # noqa: E731
    key = digest(data.fingerprint, bench.seeds, attack, MonitorConfig().model_dump_json())
    report["monitor"] = replay() if kept is None else kept.made("monitor", key, replay)
    audited = typed(report)
    safe = (audited.safe_budget or {}).get(bench.enforced, {}).get(bench.student)
    if bench.enforced and safe:  # a safe budget of 0 serves nothing: there is nothing to enforce
        ls = audited.students[bench.student].ls
        report["enforced"] = enforced_phase(
            cfg,
            data,
            boxes[bench.enforced],
            safe,
            {name: row.model_dump(mode="json") for name, row in ls.items()},
            keys=tuple(bench.enforced_keys),
            workers=workers,
            log=log,
            kept=kept,
        )
    report["summary"] = summarise_paper(report, bench, time.perf_counter() - t0)
    return report


def _train_one(
    cfg: TrainConfig, data: Dataset, init: dict[str, Any] | None
) -> tuple[nn.Module, ModelMeta, float]:
    result = train_model(cfg, data, init_weights=init)
    return result.model, result.meta, result.last_acc


def _train_teachers(
    bench: Benchmark,
    data: Dataset,
    device: str,
    workers: int,
    log: Callable[[str], None],
    kept: Kept | None = None,
) -> dict[str, list[nn.Module]]:
    """Every recipe's per-seed teachers (CE and the benchmark's CMIM first; fine-tuned ones after the CE
    teachers they start from), `workers` at a time in spawned processes; those `kept` are read back."""
    found: dict[tuple[str, int], nn.Module] = {}
    for wave in (False, True):  # fine-tuning needs the CE teachers of the first wave
        jobs = []
        for key, seed, cfg, finetune in teacher_configs(bench, device):
            if finetune != wave:
                continue
            recipe = cfg.model_dump_json()
            if kept is not None and (got := kept.teacher(key, recipe)) is not None:
                found[(key, seed)] = got[0]
                log(f"teacher {key} seed {seed}: {got[1]:.2f}% (kept)")
                continue
            init = found[(_recipe_key(bench, *CONTROL), seed)].state_dict() if finetune else None
            jobs.append((key, seed, recipe, (cfg, data, init)))
        for (key, seed, recipe, _), (model, meta, acc) in zip(
            jobs, pool_map(_train_one, [j[3] for j in jobs], workers), strict=True
        ):
            log(f"teacher {key} seed {seed}: {acc:.2f}%")
            found[(key, seed)] = model
            if kept is not None:
                kept.keep_teacher(key, recipe, model, meta, acc)
    teachers: dict[str, list[nn.Module]] = {}
    for key, seed, _, _ in teacher_configs(bench, device):  # per recipe, in seed order
        teachers.setdefault(key, []).append(found[(key, seed)])
    return teachers


def teacher_configs(bench: Benchmark, device: str = "auto") -> list[tuple[str, int, TrainConfig, bool]]:
    """(recipe key, seed, training config, fine-tuned) of every teacher the benchmark trains: one per
    distinct recipe and seed; a fine-tuned one starts from the CE teacher of its seed."""
    recipes = [CONTROL, ("cmim", bench.cmim_params, False)]
    recipes += [p.recipe(bench) for p in bench.protections.values()]
    keys = {_recipe_key(bench, *r): r for r in recipes}  # one entry per distinct recipe, in order

    def config(objective: str, params: dict[str, Any], finetune: bool, seed: int) -> TrainConfig:
        base = TrainConfig(
            dataset=bench.dataset,
            dataset_params=bench.dataset_params,
            arch=bench.teacher,
            objective=objective,
            objective_params=params,
            epochs=bench.finetune_epochs if finetune else bench.teacher_epochs,
            seed=seed,
            device=device,
        )
        # the CE teachers are the audit's CE control, set up as every job and `cmim audit` set theirs up
        return control_recipe(base) if (objective, params, finetune) == CONTROL else base

    return [
        (key, seed, config(objective, params, finetune, seed), finetune)
        for key, (objective, params, finetune) in keys.items()
        for seed in range(bench.seeds)
    ]


def _recipe_key(bench: Benchmark, objective: str, params: dict[str, Any], finetune: bool) -> str:
    """A readable name for a teacher recipe: "ce", "cmim" (the benchmark's), "cmim(lam=3.0,mixed=1.0)+ft"."""
    default = bench.cmim_params if objective == "cmim" else {}
    args = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return objective + ("" if params == default else f"({args})") + ("+ft" if finetune else "")


def _margin(section: Section, student: str) -> tuple[float | None, float | None]:
    s = section.students[student]
    return s.margin, s.margin_se


def typed(report: dict[str, Any] | AuditReport) -> AuditReport:
    """The benchmark's report read as the audit's typed result (its own sections are kept as extras)."""
    return report if isinstance(report, AuditReport) else AuditReport.model_validate(report)


def sections_of(report: AuditReport) -> dict[str, ServedSection | AuditReport]:
    """The benchmark's black boxes: the CE control, the CMIM teacher and every protection."""
    assert report.control is not None, "the benchmark always audits its CE control"
    return {"ce": report.control, "cmim": report, **(report.protections or {})}


def served_of(section: ServedSection | AuditReport) -> ServedSummary:
    """A black box's served summary: the teacher's section keeps it under `teacher`."""
    return section.teacher if isinstance(section, AuditReport) else section


def summarise_paper(stored: dict[str, Any], bench: Benchmark, wall_s: float) -> dict[str, Any]:
    """The benchmark's one-line JSON summary, in percent."""
    st, report = bench.student, typed(stored)
    control, protected = sections_of(report)["ce"], (report.protections or {})["protected"]
    ce_margin, ce_se = _margin(control, st)
    cmim_margin, cmim_se = _margin(report, st)
    p_margin, p_se = _margin(protected, st)
    safe = report.safe_budget or {}
    cost = protected.serving.honest_cost or {}
    return {
        "dataset": bench.dataset,
        "student": st,
        "seeds": bench.seeds,
        "ce_acc": served_of(control).accuracy,
        "ls_acc": control.students[st].ls_acc,
        "ce_margin": ce_margin,
        "ce_margin_se": ce_se,
        "cmim_margin": cmim_margin,
        "cmim_margin_se": cmim_se,
        "protected_acc": cost["accuracy"],
        "protected_margin": p_margin,
        "protected_margin_se": p_se,
        "honest_refused": cost["altered"],
        "safe_budget": safe.get("protected", {}).get(st),
        "ce_safe_budget": safe.get("control", {}).get(st),
        **evidence_summary(stored, st),
        "monitor_queries_to_alert": (report.monitor or {})
        .get("splits", {})
        .get("16", {})
        .get("queries_to_alert", {})
        .get("mean"),
        **enforced_summary(stored.get("enforced")),
        "wall_s": wall_s,
    }


def paper_rows(stored: dict[str, Any], student: str) -> list[list[Any]]:
    """One row per protection x attack: teacher acc, honest cost, I_T, attack acc, margin, verdict."""
    rows = []
    for name, sec in sections_of(typed(stored)).items():
        summary = served_of(sec)
        cost, s, cmi = summary.serving.honest_cost or {}, sec.students[student], summary.cmi_test
        head = [
            name,
            f"{summary.accuracy:.2f}",
            f"{cost.get('altered', 0):.1f}",
            f"{cmi['1']:.3f}/{cmi['4']:.3f}/{cmi['16']:.4f}",
        ]
        for attack, row in s.attacks.items():
            rows.append(
                head
                + [
                    attack,
                    f"{row.acc_best.mean:.2f} ± {row.acc_best.se:.2f}",
                    f"{row.margin:+.2f} ± {row.margin_se:.2f}",
                    "yes" if row.significant else "no",
                ]
            )
        rows.append(head + ["= verdict", f"LS {s.ls_acc:.2f}", f"{s.margin:+.2f}", s.verdict])
    return rows


def paper_markdown(stored: dict[str, Any], student: str) -> str:
    """The paper table as Markdown: one row per protection, one column per attack (margin ± se over the
    best LS student; * = significant, one-sided Welch at the audit's alpha; ** = also after Holm)."""
    report = typed(stored)
    sections = sections_of(report)
    attacks = list(report.students[student].attacks)
    head = ["protection", "serving", "teacher acc", "honest acc / ECE / altered %", "I_1 / I_4 / I_16"]
    lines = [
        "| " + " | ".join(head + attacks + ["verdict"]) + " |",
        "|" + "---|" * (len(head) + len(attacks) + 1),
    ]
    for name, sec in sections.items():
        summary = served_of(sec)
        serving = summary.serving
        cost, policy = serving.honest_cost or {}, serving.policy
        how = serving.output_mode.get("kind", "probs")
        if policy.get("snap"):
            how += " + snap"
        if policy.get("detector", "none") != "none":
            how += f" + {policy['detector']} ({100 * policy['fpr']:g} % FPR) -> {policy['action']}"
        cmi, st = summary.cmi_test, sec.students[student]
        cells = [
            name,
            how,
            f"{summary.accuracy:.2f}",
            f"{cost.get('accuracy', float('nan')):.2f} / {cost.get('ece', float('nan')):.2f} / "
            f"{cost.get('altered', 0):.1f}",
            f"{cmi['1']:.3f} / {cmi['4']:.3f} / {cmi['16']:.4f}",
        ]
        for a in attacks:
            row = st.attacks[a]
            mark = "**" if row.significant_holm else "*" if row.significant else ""
            cells.append(f"{row.margin:+.2f} ± {row.margin_se:.2f}{mark}")
        cells.append(st.verdict)
        lines.append("| " + " | ".join(cells) + " |")
    st = sections["ce"].students[student]
    ls = ", ".join(f"{k} {v.acc_best.mean:.2f}" for k, v in st.ls.items())
    lines += ["", f"Best LS student: {st.best_ls}, {st.ls_acc:.2f} (all LS rows: {ls})."]
    if report.budgets:
        lines += [
            "",
            "| black box | budget B | best knockoff | acc | margin vs best LS | verdict |",
            "|---|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in budget_rows(report, student)]
    lines += evidence_markdown(stored, student)
    if report.monitor:
        lines += ["", monitor_markdown(report.monitor)]
    if stored.get("enforced"):
        lines += enforced_markdown(stored["enforced"], report.config["seeds"])
    return "\n".join(lines) + "\n"


def budget_rows(stored: dict[str, Any], student: str) -> list[list[Any]]:
    """The budget curves: per black box and budget, the best knockoff, its margin and the verdict."""
    report, out = typed(stored), []
    for box, curve in (report.budgets or {}).items():
        for budget, sec in curve.items():
            s = sec.students[student]
            best = s.attacks[s.best_attack or ""]
            out.append(
                [
                    box,
                    budget,
                    s.best_attack,
                    f"{best.acc_best.mean:.2f} ± {best.acc_best.se:.2f}",
                    f"{s.margin:+.2f} ± {s.margin_se:.2f}",
                    s.verdict,
                ]
            )
        out.append([box, "safe", "", "", "", str((report.safe_budget or {})[box][student])])
    return out


def plot_paper(stored: dict[str, Any], student: str, path: str) -> None:
    """Margins (each attack against each protection) with standard-error bars, as an SVG figure."""
    report = typed(stored)
    bars = [
        Bar(f"{name} · {attack}", row.margin or 0.0, row.margin_se or 0.0, highlight=name == "ce")
        for name, sec in sections_of(report).items()
        for attack, row in sec.students[student].attacks.items()
    ]
    title = f"{report.dataset.name}, {student} student, {report.config['seeds']} seeds"
    write_svg(bar_chart(bars, title, "knockoff acc - best LS acc (points)", reference=0.0), path)
