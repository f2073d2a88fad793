"""The audit: a reduced run is complete and consistent; verdicts follow SPEC.md's rule; lockstep is honest."""

import math

import pytest
import torch

from ml.attacks import ATTACKS
from ml.audit import AuditConfig, Run, combine_verdicts, judge, run_audit, summarise, train_lockstep
from ml.data import load_dataset
from ml.oracle import Oracle, OutputMode


def test_reduced_audit_is_complete_and_consistent(data, teachers) -> None:
    teacher, control = teachers
    cfg = AuditConfig(
        students=["mlp", "cnn1d_small"],
        seeds=2,
        epochs=2,
        ls_eps=[0.0, 0.1],
        batch_size=64,
        query_budgets=[],
        device="cpu",
    )
    seen = []
    report = run_audit(cfg, teacher, data, control=control, on_progress=seen.append)
    assert seen[-1].done == seen[-1].total == 4
    expected_rows = {name for name, _, _ in cfg.attack_rows()}
    assert {"kd_t1", "kd_t4", "kd_t10", "kd_t20", "fm", "skeptical", "mlkd"} <= expected_rows
    assert set(ATTACKS.names()) <= {r.split("_t")[0] if r.startswith("kd_t") else r for r in expected_rows}
    for section in (report, report["control"]):
        assert set(section["students"]) == {"mlp", "cnn1d_small"}
        for s in section["students"].values():
            assert set(s["attacks"]) == expected_rows
            assert set(s["ls"]) == {"ls_0", "ls_0.1", "ls_mixup_0", "ls_mixup_0.1"}
            ls_means = {k: v["acc_best"]["mean"] for k, v in s["ls"].items()}
            attack_means = {k: v["acc_best"]["mean"] for k, v in s["attacks"].items()}
            assert s["best_ls"] == max(ls_means, key=ls_means.get)
            assert s["margin"] == pytest.approx(max(attack_means.values()) - max(ls_means.values()))
            assert s["verdict"] == judge(s["ls"], s["attacks"], cfg.alpha)["verdict"]
            for row in s["attacks"].values():
                assert len(row["acc_best"]["values"]) == 2
                assert row["acc_best"]["mean"] >= row["acc_last"]["mean"]
                assert 0 <= row["fidelity"]["mean"] <= 100
                assert row["queries"] >= cfg.epochs * len(data.x_train)
    mlkd = report["students"]["mlp"]["attacks"]["mlkd"]
    assert mlkd["queries"] == 2 * cfg.epochs * len(data.x_train)  # weak and strong view
    assert report["verdict"] in {"distillable", "undistillable", "inconclusive"}
    assert report["teacher"]["accuracy"] > 10 and set(report["teacher"]["cmi_test"]) >= {"1", "4", "16"}


def test_verdict_rule() -> None:
    def rows(*accs: list[float]) -> dict:
        return {f"r{i}": {"acc_best": summarise(a), "acc_last": summarise(a)} for i, a in enumerate(accs)}

    ls = rows([80, 81, 80.5, 79.5, 80], [70, 71, 70, 70, 71])
    assert judge(ls, rows([90, 91, 90.5, 89.5, 90]), 0.05)["verdict"] == "distillable"
    assert judge(ls, rows([79, 80, 79.5, 78.5, 79]), 0.05)["verdict"] == "undistillable"
    noisy = judge(ls, rows([70, 92, 75, 88, 80]), 0.05)
    assert noisy["verdict"] == "inconclusive" and "not significant" in noisy["reason"]
    assert judge(rows([80]), rows([90]), 0.05)["verdict"] == "inconclusive"
    j = judge(ls, rows([85, 86, 85.5, 84.5, 85], [90, 91, 90.5, 89.5, 90]), 0.05)
    assert j["best_attack"] == "r1" and j["best_ls"] == "r0"
    assert j["margin"] == pytest.approx(10.0) and j["margin_se"] == pytest.approx(0.0, abs=1e-9)
    assert combine_verdicts(["undistillable", "distillable"]) == "distillable"
    assert combine_verdicts(["undistillable", "inconclusive"]) == "inconclusive"


def test_undistillable_without_distillable_control_is_inconclusive(data, teachers) -> None:
    teacher, control = teachers
    # one epoch of hard-label copying cannot beat LS: both teacher and control come out undistillable
    cfg = AuditConfig(seeds=2, epochs=1, attacks=["hard_label"], ls_eps=[0.1], ls_mixup=False, device="cpu")
    report = run_audit(cfg, teacher, data, control=control)
    assert report["control"]["verdict"] != "distillable"  # the premise, checked rather than assumed
    assert report["verdict"] != "undistillable"
    if report["students"]["mlp"]["verdict"] == "undistillable":
        assert report["verdict"] == "inconclusive" and "cannot discriminate" in report["verdict_reason"]
    with pytest.raises(ValueError, match="control"):
        run_audit(cfg, teacher, data)


def test_lockstep_student_equals_the_same_student_alone(data, teachers) -> None:
    cfg = AuditConfig(seeds=1, epochs=2, batch_size=64, device="cpu", control=False)
    oracle = {"teacher": Oracle(teachers[0])}

    def kd() -> Run:
        return Run("kd", "mlp", teacher="teacher", attack=ATTACKS.get("kd")(10, None))

    alone = kd()
    train_lockstep([alone], data, oracle, cfg, seed=5)
    together = kd()
    others = [
        Run(k, "mlp", teacher="teacher", attack=ATTACKS.get(k)(10, None))
        for k in ("fm", "hard_label", "mlkd")
    ]
    train_lockstep([together, *others, Run("ls", "mlp", eps=0.1)], data, oracle, cfg, seed=5)
    assert together.acc == pytest.approx(alone.acc, abs=1.0)  # same batches, same init; vmap rounding only
    assert oracle["teacher"].queries > 0


def test_label_only_serving_reaches_the_attacks(data, teachers) -> None:
    cfg = AuditConfig(
        seeds=1,
        epochs=1,
        attacks=["kd"],
        attack_params={"kd": {"T": 4}},
        ls_eps=[0.1],
        control=False,
        output_mode=OutputMode(kind="label"),
        compare_raw=True,
        device="cpu",
    )
    report = run_audit(cfg, teachers[0], data)
    assert report["threat_model"]["output_mode"]["kind"] == "label"
    assert set(report["students"]["mlp"]["attacks"]) == {"kd"}
    assert report["raw_probabilities"]["students"]["mlp"]["attacks"]["kd"]["acc_best"]["mean"] > 0
    assert report["verdict"] == "inconclusive" and "1 seed" in report["verdict_reason"]
    assert not math.isnan(report["students"]["mlp"]["attacks"]["kd"]["fidelity"]["mean"])


def test_bad_audit_config_names_valid_choices() -> None:
    with pytest.raises(ValueError, match="unknown attack 'stealing'"):
        AuditConfig(attacks=["stealing"])
    with pytest.raises(ValueError, match="unknown model"):
        AuditConfig(students=["gpt"])
    with pytest.raises(ValueError, match="T"):
        AuditConfig(attacks=["kd"], attack_params={"kd": {"temperature": 4}}).attack_rows()
    with pytest.raises(ValueError):
        AuditConfig(ls_eps=[1.5])


def test_budget_curve_spends_exactly_the_budget(data, teachers) -> None:
    cfg = AuditConfig(
        seeds=2,
        epochs=2,
        attacks=["fm", "mlkd", "hard_label"],
        ls_eps=[0.1],
        ls_mixup=False,
        query_budgets=[100, 400],
        device="cpu",
        control=True,
    )
    seen = []
    report = run_audit(cfg, teachers[0], data, control=teachers[1], on_progress=seen.append)
    assert seen[-1].done == seen[-1].total
    for t in ("teacher", "control"):
        for b in (100, 400):
            rows = report["budgets"][t][str(b)]["students"]["mlp"]["attacks"]
            assert {n: r["queries"] for n, r in rows.items()} == {
                "fm": b,
                "fm_t1": b,
                "mlkd": b,
                "hard_label": b,
            }
        safe = report["safe_budget"][t]["mlp"]
        margins = [report["budgets"][t][str(b)]["students"]["mlp"]["margin"] for b in (100, 400)]
        expected = 0 if margins[0] > 0 else (100 if margins[1] > 0 else 400)
        assert safe == expected


def test_per_seed_teachers_and_extra_protections_share_the_ls_students(data, teachers) -> None:
    from ml.audit import BlackBox

    cfg = AuditConfig(
        seeds=2, epochs=1, attacks=["fm"], ls_eps=[0.1], ls_mixup=False, control=False, device="cpu"
    )
    boxes = {"label_only": BlackBox(list(teachers), OutputMode(kind="label"))}
    report = run_audit(cfg, list(teachers), data, protections=boxes)
    prot = report["protections"]["label_only"]
    assert prot["serving"]["output_mode"]["kind"] == "label"
    assert prot["students"]["mlp"]["ls"] == report["students"]["mlp"]["ls"]
    assert set(prot["students"]["mlp"]["attacks"]) == {"fm", "fm_t1"}
    assert len(report["teacher"]["accuracy_stats"]["values"]) == 2


def test_policy_is_audited_and_refused_queries_fall_back_to_own_labels(data, teachers) -> None:
    from ml.policy import PolicyConfig

    policy = PolicyConfig(detector="confidence", fpr=0.2, action="refuse")
    cfg = AuditConfig(
        seeds=1,
        epochs=1,
        attacks=["fm", "kd"],
        attack_params={"kd": {"T": 4}},
        ls_eps=[0.1],
        control=False,
        policy=policy,
        compare_raw=True,
        device="cpu",
    )
    report = run_audit(cfg, teachers[0], data)
    cost = report["teacher"]["serving"]["honest_cost"]
    assert report["teacher"]["serving"]["policy"]["detector"] == "confidence"
    assert 5 < cost["refused"] < 50  # calibrated at 20 % on the other half of the test split
    for row in report["students"]["mlp"]["attacks"].values():
        assert math.isfinite(row["acc_best"]["mean"])  # refused rows became the attacker's own labels
    assert "raw_probabilities" in report


def test_refused_answers_become_the_attackers_own_targets(data, teachers) -> None:
    from ml.audit import LiveSource
    from ml.policy import PolicyConfig, fit_policy

    fitted = fit_policy(
        PolicyConfig(detector="energy", fpr=0.5), teachers[0], data.x_train, data.y_train, data.x_test
    )
    cfg = AuditConfig(seeds=1, epochs=1, device="cpu", control=False)
    run = Run("fm", "mlp", teacher="teacher", attack=ATTACKS.get("fm")(10, None))
    source = LiveSource([run], data, {"teacher": Oracle(teachers[0], policy=fitted)}, cfg, seed=0)
    batch, served = next(source.epoch())
    answer, refused = served["teacher"]["mixup"], source.oracles["teacher"].last.refused
    assert 0 < int(refused.sum()) < len(refused)
    perm, lam = batch.mix["mixup"]
    own = lam[:, None] * torch.nn.functional.one_hot(batch.y, 10) + (1 - lam[:, None]) * (
        torch.nn.functional.one_hot(batch.y[perm], 10)
    )
    assert torch.allclose(answer[refused], own[refused].float())
    assert torch.allclose(answer.sum(-1), torch.ones(len(answer)))


def test_unlabelled_transfer_set_is_queried_and_hard_label_joins_the_baseline(data, teachers) -> None:
    cfg = AuditConfig(
        seeds=2,
        epochs=1,
        attacks=["fm", "kd"],
        attack_params={"kd": {"T": 4}},
        ls_eps=[0.1],
        control=False,
        transfer="mnist1d",
        transfer_params={"num_train": 200, "num_test": 100, "seed": 7},
        device="cpu",
    )
    report = run_audit(cfg, teachers[0], data)
    s = report["students"]["mlp"]
    assert report["threat_model"]["transfer"]["samples"] == 200
    assert "hard_label_transfer" in s["ls"] and set(s["attacks"]) == {"fm", "fm_t1", "kd"}
    assert s["best_ls"] == max(s["ls"], key=lambda k: s["ls"][k]["acc_best"]["mean"])
    with pytest.raises(ValueError, match="inputs"):
        run_audit(cfg.model_copy(update={"transfer": "digits", "transfer_params": {}}), teachers[0], data)


def test_transfer_batches_carry_unlabelled_rows_after_the_labelled_ones(data, teachers) -> None:
    from ml.audit import LiveSource

    cfg = AuditConfig(seeds=1, epochs=1, batch_size=32, device="cpu", control=False)
    runs = [
        Run("fm", "mlp", teacher="teacher", attack=ATTACKS.get("fm")(10, None)),
        Run("ls", "mlp", mixup=True),
    ]
    pool = load_dataset("mnist1d", num_train=100, num_test=100, seed=9).x_train
    source = LiveSource(runs, data, {"teacher": Oracle(teachers[0])}, cfg, seed=0, transfer=pool)
    batch, served = next(source.epoch())
    assert batch.labelled == 32 and len(batch.y) == 64 and (batch.y[32:] == -1).all()
    perm = batch.mix["mixup"][0]
    assert (perm[:32] < 32).all() and (perm[32:] >= 32).all()
    assert served["teacher"]["mixup"].shape == (64, 10)


def test_parallel_seeds_give_the_same_report_and_budgets_only_where_asked(data, teachers) -> None:
    from ml.audit import BlackBox

    cfg = AuditConfig(
        seeds=2,
        epochs=2,
        attacks=["fm_edge", "hard_label"],
        ls_eps=[0.1],
        query_budgets=[150],
        output_mode=OutputMode(),
        device="cpu",
    )
    boxes = {"label_only": BlackBox(list(teachers), OutputMode(kind="label"))}
    kwargs = {"control": teachers[1], "protections": boxes, "budget_for": ["label_only"]}
    seen: list = []
    one = run_audit(cfg, teachers[0], data, workers=1, **kwargs)
    two = run_audit(cfg, teachers[0], data, workers=2, on_progress=seen.append, **kwargs)
    # seeds x epochs x (unlimited + one budget + the null's one model of cnn1d_small)
    assert seen[-1].done == seen[-1].total == 2 * 2 * 3
    for r in (one, two):
        for k in ("wall_s", "timing", "findings"):  # measured times differ between runs
            r.pop(k)
    assert one == two
    assert list(one["budgets"]) == ["label_only"] and list(one["safe_budget"]) == ["label_only"]
    rows = one["budgets"]["label_only"]["150"]["students"]["mlp"]["attacks"]
    assert {n: r["queries"] for n, r in rows.items()} == {"fm_edge": 150, "hard_label": 150}
    seen.clear()  # no box under budgets: no budget phases, and the report and progress say so
    none = run_audit(cfg, teachers[0], data, control=teachers[1], budget_for=[], on_progress=seen.append)
    assert "budgets" not in none and none["config"]["query_budgets"] == []
    assert seen[-1].done == seen[-1].total == 2 * 2 * 2  # the unlimited phase and the null's model
    with pytest.raises(ValueError, match="budget_for names no audited black box: nope"):
        run_audit(cfg, teachers[0], data, control=teachers[1], budget_for=["nope"])


def test_adaptive_views_stay_near_real_inputs(data, teachers) -> None:
    from ml.audit import LiveSource
    from ml.policy import PolicyConfig, fit_policy

    cfg = AuditConfig(seeds=1, epochs=1, batch_size=64, augment=False, device="cpu", edge_range=(0.8, 0.9))
    runs = [
        Run(k, "mlp", teacher="teacher", attack=ATTACKS.get(k)(10, None)) for k in ("fm_edge", "fm_noise")
    ]
    fitted = fit_policy(
        PolicyConfig(detector="energy", fpr=0.5), teachers[0], data.x_train, data.y_train, data.x_test
    )
    source = LiveSource(runs, data, {"teacher": Oracle(teachers[0], policy=fitted)}, cfg, seed=0)
    batch, served = next(source.epoch())
    assert set(batch.views) == {"plain", "mixup_edge", "noise"}  # no uniform mixup was built
    perm, lam = batch.mix["mixup_edge"]
    assert ((lam >= 0.8) & (lam <= 0.9)).all()
    x = batch.views["plain"]
    mixed = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[perm]
    assert torch.allclose(batch.views["mixup_edge"], mixed)
    noise_std = float((batch.views["noise"] - x).std() / torch.tensor(data.std).mean())
    assert noise_std == pytest.approx(cfg.noise_scale, rel=0.1)
    # a refused mix near one input falls back to the attacker's own mixed label at the edge ratio
    replay = Oracle(teachers[0], policy=fitted)  # the energy detector is stateless: same decisions
    replay(batch.views["mixup_edge"])
    refused = replay.last.refused
    y1 = torch.nn.functional.one_hot(batch.y, 10).float()
    own = lam[:, None] * y1 + (1 - lam[:, None]) * y1[perm]
    answer = served["teacher"]["mixup_edge"]
    assert 0 < int(refused.sum()) < len(refused)
    assert torch.allclose(answer[refused], own[refused])


def test_black_boxes_serving_one_model_share_its_forward_pass(data, teachers) -> None:
    from ml.audit import LiveSource

    calls = []
    handle = teachers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        cfg = AuditConfig(seeds=1, epochs=1, batch_size=64, device="cpu", control=False)
        oracles = {"probs": Oracle(teachers[0]), "label": Oracle(teachers[0], OutputMode(kind="label"))}
        runs = [Run("fm", "mlp", teacher=t, attack=ATTACKS.get("fm")(10, None)) for t in oracles]
        batch, served = next(LiveSource(runs, data, oracles, cfg, seed=0).epoch())
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward for the mixup view, served two ways
    alone = Oracle(teachers[0])(batch.views["mixup"])
    assert torch.equal(served["probs"]["mixup"], alone)
    assert torch.equal(served["label"]["mixup"].argmax(-1), alone.argmax(-1))
    assert torch.equal(served["label"]["mixup"].sum(-1), torch.ones(64))


def test_holm_adjustment_and_verdict_reason() -> None:
    from ml.audit import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert math.isnan(holm([float("nan"), 0.01])[0]) and holm([float("nan"), 0.01])[1] == pytest.approx(0.01)

    def row(values: list[float]) -> dict:
        return {"acc_best": summarise(values), "acc_last": summarise(values)}

    ls = {"ls": row([80.0, 81.0, 80.5])}
    attacks = {"a": row([85.0, 86.0, 85.5]), "b": row([70.0, 71.0, 70.5])}
    out = judge(ls, attacks, 0.05)
    assert out["verdict"] == "distillable" and "Holm-adjusted over 2 attack rows" in out["reason"]
    assert attacks["a"]["p_holm"] == pytest.approx(min(1.0, 2 * attacks["a"]["p_value"]))
    assert attacks["a"]["significant_holm"] and not attacks["b"]["significant_holm"]


def test_default_budget_curve_is_1_5_and_25_passes_over_the_labelled_set(data, teachers) -> None:
    cfg = AuditConfig(seeds=2, epochs=1, attacks=["hard_label"], ls_eps=[0.1], ls_mixup=False, device="cpu")
    assert cfg.query_budgets is None and cfg.budgets(300) == [300, 1500, 7500]
    report = run_audit(
        cfg.model_copy(update={"labelled_fraction": 0.5}), teachers[0], data, control=teachers[1]
    )
    half = report["threat_model"]["labelled_samples"]
    assert (
        report["config"]["query_budgets"]
        == report["threat_model"]["query_budgets"]
        == [half, 5 * half, 25 * half]
    )
    assert set(report["safe_budget"]) == {"teacher", "control"}
    assert report["safe_budget"]["teacher"]["mlp"] in (0, half, 5 * half, 25 * half)
    assert AuditConfig(query_budgets=[]).budgets(300) == []
    statement = report["statement"]
    assert statement["served_as"] == "labels only" and statement["text"].startswith("Served as labels only.")
    rows = report["students"]["mlp"]["attacks"]
    assert len(statement["stops"]) + len(statement["does_not_stop"]) == len(rows)
    assert len(statement["stops"]) == sum(r["margin"] <= 0 for r in rows.values())
    safe = report["safe_budget"]["teacher"]["mlp"]
    assert (f"at most {safe:,} queries per key" in statement["text"]) == (safe > 0)


def test_stacked_mlp_students_give_the_numbers_of_vmap_over_the_module(data) -> None:
    """The baddbmm chain of a stacked MLP: logits, gradients and test predictions equal to the bit to
    vmap over functional_call of the module, with one shared view and with a view per slot."""
    from torch.func import functional_call, vmap

    from ml.audit import Batch, StackedGroup
    from ml.audit.groups import mlp_layers
    from ml.models import build_model

    torch.manual_seed(0)
    init = build_model("mlp", data.input_shape, data.num_classes, mean=data.mean, std=data.std)
    assert mlp_layers(init) == ["1.1", "1.3", "1.5"]
    assert mlp_layers(build_model("cnn1d_small", data.input_shape, data.num_classes)) is None  # vmap path
    g = torch.Generator().manual_seed(1)
    x = {v: torch.randn(32, *data.input_shape, generator=g) for v in ("plain", "mixup", "noise")}
    for views in (["plain"] * 3, ["plain", "mixup", "noise"]):
        runs = [Run(f"r{i}", "mlp", mixup=v == "mixup") for i, v in enumerate(views)]
        runs[2].attack = ATTACKS.get("fm_noise")(data.num_classes, None) if views[2] == "noise" else None
        group = StackedGroup(runs, init)
        with torch.no_grad():  # students that differ, as after some training
            for p in group.params.values():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        batch = Batch(y=torch.zeros(32, dtype=torch.long), views=x)
        fast = group.logits(batch)
        fast.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in group.params.items()}
        for p in group.params.values():
            p.grad = None

        def fwd(p, b, x, base=group.base):
            return functional_call(base, (p, b), (x,))

        xs = torch.stack([x[v] for _, v in group.slots])
        slow = vmap(fwd)(group.params, group.buffers, xs)
        slow.square().sum().backward()
        assert torch.equal(fast, slow)
        assert all(torch.equal(grads[k], p.grad) for k, p in group.params.items())
        with torch.no_grad():
            expected = vmap(fwd, in_dims=(0, 0, None))(group.params, group.buffers, data.x_test).argmax(-1)
        assert torch.equal(group.predict(data.x_test), expected)
