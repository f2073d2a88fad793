"""`cmim bench paper` on a tiny benchmark: every protection is present and the summary is consistent."""

from pathlib import Path
from typing import Any

import pytest
import torch

import ml.audit.tasks as tasks_module
from ml.benchmark import (
    BENCHMARKS,
    Benchmark,
    Protection,
    budget_rows,
    evidence_summary,
    paper_markdown,
    paper_rows,
    run_paper,
)
from ml.oracle import OutputMode

SUMMARY_KEYS = {
    "dataset",
    "student",
    "seeds",
    "ce_acc",
    "monitor_queries_to_alert",
    "ls_acc",
    "ce_margin",
    "ce_margin_se",
    "cmim_margin",
    "cmim_margin_se",
    "protected_acc",
    "protected_margin",
    "protected_margin_se",
    "honest_refused",
    "safe_budget",
    "ce_safe_budget",
    "evidence_tpr",
    "evidence_fpr",
    "evidence_cost",
    "evidence_fpr_by_family",
    "evidence_widest_tpr",
    "evidence_selected_tpr",
    "evidence_selected_fpr",
    "evidence_selected_fpr_by_family",
    "enforced_margin",
    "enforced_margin_se",
    "enforced_queries",
    "honest_suspended",
    "honest_limited",
    "wall_s",
}


def tiny(**changes: Any) -> Benchmark:
    """The benchmark at tiny sizes: 200 samples, one epoch, two seeds, hard_label against one LS student."""
    protected = Protection(output_mode=OutputMode(kind="label"))
    fields: dict[str, Any] = {
        "dataset_params": {"num_train": 200, "num_test": 200},
        "teacher_epochs": 1,
        "epochs": 1,
        "seeds": 2,
        "attacks": ["hard_label"],
        "attack_params": {},
        "ls_eps": [0.1],
        "query_budgets": [100],
        "protections": {"protected": protected},
    }
    return Benchmark(**(fields | changes))


def test_tiny_paper_benchmark() -> None:
    bench = tiny(
        protections={
            "protected": Protection(output_mode=OutputMode(kind="label")),
            "ce_label": Protection(objective="ce", output_mode=OutputMode(kind="label")),
        }
    )
    report = run_paper(bench, device="cpu", log=lambda m: None)
    # the ce and cmim rows are the teachers served with full probabilities, whatever the audit default is
    assert report["threat_model"]["output_mode"]["kind"] == "probs"
    assert report["protections"]["protected"]["serving"]["output_mode"]["kind"] == "label"
    summary = report["summary"]
    assert set(summary) == SUMMARY_KEYS
    table = paper_markdown(report, "mlp").splitlines()
    assert table[0].startswith("| protection | serving |") and "hard_label" in table[0]
    assert [line.split(" | ")[0] for line in table[2:6]] == ["| ce", "| cmim", "| protected", "| ce_label"]
    assert table[4].split(" | ")[1] == "label" and "| control | 100 |" in "\n".join(table)
    assert summary["cmim_margin"] == report["students"]["mlp"]["margin"]
    assert summary["ce_margin"] == report["control"]["students"]["mlp"]["margin"]
    assert summary["protected_margin"] == report["protections"]["protected"]["students"]["mlp"]["margin"]
    assert summary["safe_budget"] in (0, 100)
    # the enforced black box: the default protection at its safe budget, attacked with 1, 16, 256 keys
    if summary["safe_budget"]:
        rows = report["enforced"]["rows"]
        assert {name.rsplit(" K=", 1)[1] for name in rows} == {"1", "16", "256"}
        assert {"hard_label K=1", "jitter K=256", "fresh_mix K=16", "slow K=256"} <= set(rows)
        assert summary["enforced_margin"] == max(r["margin"] for r in rows.values())
        assert rows["hard_label K=1"]["queries"]["mean"] <= 100
        assert summary["honest_suspended"] == 0 and "| jitter | 256 |" in "\n".join(table)
    else:
        assert "enforced" not in report and summary["enforced_margin"] is None
    names = {row[0] for row in paper_rows(report, "mlp")}
    assert names == {"ce", "cmim", "protected", "ce_label"}
    # budget curves only for the boxes the benchmark names: the control and the default protection
    assert set(report["budgets"]) == set(report["safe_budget"]) == {"control", "protected"}
    assert [row[:2] for row in budget_rows(report, "mlp")] == [
        ["control", "100"],
        ["control", "safe"],
        ["protected", "100"],
        ["protected", "safe"],
    ]
    assert summary["ce_safe_budget"] == report["safe_budget"]["control"]["mlp"]
    # evidence: the default mechanism over the default protection and the control (2 + 2 LS students)
    fingerprint = report["evidence"]["mechanisms"]["fingerprint"]
    assert fingerprint["protected"]["mlp"]["negatives"].keys() == {"plain", "mixup"}
    assert summary["evidence_fpr"] == max(fingerprint[b]["mlp"]["fpr"] for b in ("protected", "control"))
    assert summary["evidence_cost"] == 0.0 and "| fingerprint | protected |" in "\n".join(table)
    # the null's other architectures (the zoo's other small student family on sequences): a rate per family
    assert set(summary["evidence_fpr_by_family"]) == {"plain", "mixup", "cnn1d_small"}
    widest = [fingerprint[b]["mlp"]["other_architectures"] for b in ("protected", "control")]
    if any(
        w.get("near_ls_unlimited") for w in widest
    ):  # a share of the near-LS knockoffs, when there are any
        assert 0.0 <= summary["evidence_widest_tpr"] <= 1.0
    else:
        assert summary["evidence_widest_tpr"] is None
    full = BENCHMARKS.get("mnist1d")
    assert "protected" in full.protections and {"fm", "fm_edge", "fm_noise"} <= set(full.attacks)


def test_protections_name_their_teacher_recipe_and_share_teachers() -> None:
    bench = Benchmark(
        dataset_params={"num_train": 200, "num_test": 200},
        teacher_epochs=1,
        finetune_epochs=1,
        epochs=1,
        seeds=2,
        attacks=["fm"],
        attack_params={},
        ls_eps=[0.1],
        query_budgets=[],
        budget_for=[],
        protections={
            "protected": Protection(output_mode=OutputMode(kind="label")),
            "ft": Protection(finetune=True),
            "mix": Protection(objective_params={"lam": 3.0, "mixed": 1.0}),
        },
    )
    logs: list[str] = []
    # teachers and seeds trained in two spawned workers give the same report, at the same thread count: a
    # run's numbers depend on its seed and thread count (on some CPUs 1 and 2 threads round apart)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # here, and so in each of the two workers
    try:
        report = run_paper(bench, device="cpu", log=logs.append)
        parallel = run_paper(bench, device="cpu", workers=2, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    for r in (report, parallel):
        r.pop("wall_s"), r["summary"].pop("wall_s"), r.pop("timing"), r.pop("findings")  # measured times
    assert parallel == report
    trained = sorted({m.split(" seed ")[0] for m in logs})
    # "protected" serves the benchmark's cmim teachers: no third cmim recipe was trained for it
    assert trained == ["teacher ce", "teacher cmim", "teacher cmim(lam=3.0,mixed=1.0)", "teacher cmim+ft"]
    assert len(logs) == 4 * bench.seeds
    assert report["protections"]["protected"]["accuracy"] == report["teacher"]["accuracy"]
    assert report["protections"]["ft"]["accuracy"] != report["teacher"]["accuracy"]
    assert "budgets" not in report


def test_a_stopped_run_continues_from_what_its_folder_kept(tmp_path: Path) -> None:
    """With `keep`, every teacher and audit task is kept as it finishes: run again, nothing is trained
    twice and the report is the same; a piece lost (a task stopped part-way) is trained again alone."""
    bench = tiny(enforced="")
    first_logs: list[str] = []
    first = run_paper(bench, device="cpu", log=first_logs.append, keep=tmp_path)
    tasks = sorted((tmp_path / "tasks").glob("*.json"))
    assert len(tasks) == 2 * 3  # two seeds: the unlimited phase, one budget and the null's models
    assert len(list((tmp_path / "teachers").glob("*/model.safetensors"))) == 2 * 2  # ce and cmim, two seeds
    assert len(list((tmp_path / "monitor").glob("*.json"))) == 1  # the monitor's replay over the seeds
    assert "-s1-nulls-" in tasks[-1].name
    tasks[-1].unlink()  # as if the run had stopped while training it (the null's task: trained alone)
    logs: list[str] = []
    ticks: list[str] = []
    again = run_paper(
        bench, device="cpu", log=logs.append, keep=tmp_path, on_progress=lambda p: ticks.append(p.message)
    )
    assert logs == [f"{m} (kept)" for m in first_logs]  # no teacher trained again
    assert sum("stored result" in t for t in ticks) == 5 and tasks[-1].exists()
    for r in (first, again):
        r.pop("wall_s"), r["summary"].pop("wall_s"), r.pop("timing"), r.pop("findings")  # measured times
    assert again == first


def test_kept_tasks_are_read_back_where_the_cpu_rounds_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A continued run on another kind of CPU measures its challenges and fitted policies a rounding
    apart, so its plan's fingerprint differs; the folder names its tasks by the fingerprint it recorded
    first for a plan given the same things, so they are read back, not trained again."""
    bench = tiny(enforced="")
    run_paper(bench, device="cpu", log=lambda m: None, keep=tmp_path)
    recorded = next((tmp_path / "plans").glob("*.json")).read_text()
    measured = tasks_module.model_logits
    monkeypatch.setattr(tasks_module, "model_logits", lambda m, x: measured(m, x) + 1e-3)
    ticks: list[str] = []
    tick = lambda p: ticks.append(p.message)  # noqa: E731
    run_paper(bench, device="cpu", log=lambda m: None, keep=tmp_path, on_progress=tick)
    assert sum("stored result" in t for t in ticks) == 6
    assert len(list((tmp_path / "tasks").glob("*.json"))) == 6
    assert next((tmp_path / "plans").glob("*.json")).read_text() == recorded
    # a plan given something else (another LS student) is another plan: its tasks are trained
    ticks.clear()
    run_paper(
        tiny(enforced="", ls_eps=[0.2]), device="cpu", log=lambda m: None, keep=tmp_path, on_progress=tick
    )
    assert not any("stored result" in t for t in ticks)
    assert len(list((tmp_path / "plans").glob("*.json"))) == 2


def test_the_widest_nulls_tpr_is_over_every_near_ls_knockoff_of_both_boxes() -> None:
    """`evidence_widest_tpr` pools the near-LS knockoffs tested against the widest null over the two
    boxes (3 of 4 called here: 2 of 3 and 1 of 1), not the mean of the boxes' rates (0.83)."""

    def section(near: int, tpr: float | None) -> dict[str, Any]:
        widest = {"near_ls_unlimited": near, "tpr_near_ls_unlimited": tpr, "fpr_by_family": {"cnn": 0.0}}
        row = {"p": [0.001] * near, "near_ls": [True] * near}
        return {"null": {}, "fpr": 0.0, "phases": {"unlimited": {"fm": row}}, "other_architectures": widest}

    def report(*sections: dict[str, Any]) -> dict[str, Any]:
        boxes = dict(zip(("protected", "control"), ({"mlp": s} for s in sections), strict=False))
        return {"evidence": {"alpha": 0.01, "mechanisms": {"fingerprint": boxes}}}

    assert evidence_summary(report(section(3, 2 / 3), section(1, 1.0)), "mlp")["evidence_widest_tpr"] == 0.75
    # no near-LS knockoff tested against the widest null: no rate, not 0
    assert evidence_summary(report(section(0, None), section(0, None)), "mlp")["evidence_widest_tpr"] is None


def test_the_per_family_rates_are_the_worst_over_both_boxes_of_each_mechanism() -> None:
    def section(rates: dict[str, float | None]) -> dict[str, Any]:
        return {
            "null": {},
            "fpr": 0.0,
            "fpr_by_family": rates,
            "phases": {},
            "other_architectures": {"fpr_by_family": rates},
        }

    boxes = {
        "protected": {"mlp": section({"cnn1d": 0.0, "plain": 0.1})},
        "control": {"mlp": section({"cnn1d": 0.2, "plain": None})},
    }
    got = evidence_summary(
        {"evidence": {"alpha": 0.01, "mechanisms": {"fingerprint": boxes, "selected": boxes}}}, "mlp"
    )
    assert (
        got["evidence_fpr_by_family"]
        == got["evidence_selected_fpr_by_family"]
        == {"cnn1d": 0.2, "plain": 0.1}
    )
    assert BENCHMARKS.get("mnist1d").null_models == 3 and "cnn1d" in BENCHMARKS.get("mnist1d").null_archs
