"""A teacher that runs elsewhere, audited through a callable: each distinct input is asked once, the phases
an owner's query cap allows (the unlimited phase when it pays for it, then the budgets cheapest first) are
planned before anything is asked and never pass it, and the same audit again asks the same inputs in the same
order. A cap below the unlimited phase gives a verdict at the largest budget it paid for, and says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from owner_models import spiral

from ml.audit import AnsweringModel, AuditConfig, assemble, deployed_phases, plan, run_in_process
from ml.cmi import model_logits
from ml.data import load_dataset
from ml.train import TrainConfig, train_model

AUDIT = {
    "students": ["mlp"],
    "attacks": ["kd", "hard_label"],
    "attack_params": {"kd": {"T": 4.0}},
    "seeds": 1,
    "epochs": 2,
    "ls_eps": [0.0],
    "ls_mixup": False,
    "output_mode": {"kind": "probs"},
    "null_archs": [],
    "device": "cpu",
}


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(the data, the owner's model as trained elsewhere, its recipe)."""
    data = load_dataset("npz", path=str(spiral(tmp_path_factory.mktemp("spiral") / "spiral.npz")))
    recipe = TrainConfig(dataset="npz", arch="mlp", objective="ce", epochs=20, seed=0, device="cpu")
    data = recipe.prepare(data)
    return data, train_model(recipe, data).model.eval(), recipe


class Endpoint:
    """The owner's model behind a numpy call, counting every row it is asked."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.rows, self.calls = model, 0, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.rows += len(x)
        self.calls += 1
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()


def test_each_distinct_input_is_asked_once(owner: tuple) -> None:
    data, model, _ = owner
    endpoint = Endpoint(model)
    remote = AnsweringModel(endpoint, data.num_classes)
    x = data.x_test
    twice = torch.cat([x[:10], x, x[5:20]])
    got = remote(twice)
    assert endpoint.rows == len(x) == remote.asked and endpoint.calls == 1
    with torch.no_grad():
        assert torch.allclose(got, model(twice), atol=1e-5)
    assert torch.equal(model_logits(remote, x), got[10 : 10 + len(x)]) and endpoint.calls == 1
    bad = AnsweringModel(lambda a: np.zeros((len(a), 2), np.float32), data.num_classes)
    with pytest.raises(ValueError, match="answered shape"):
        bad(x[:4])


def test_a_cap_allows_the_cheap_phases_first() -> None:
    cfg = AuditConfig.model_validate(AUDIT | {"query_budgets": [50, 200, 5000]})
    wide = deployed_phases(cfg, 160, 80, 160, 100_000)
    assert wide.budgets == [50, 200, 5000] and wide.needed == 160 + 80 + 2 * 160
    assert wide.needed < wide.most_queries <= 100_000
    narrow = deployed_phases(cfg, 160, 80, 160, 1200)
    assert narrow.budgets == [50, 200] and narrow.skipped == [5000] and narrow.most_queries <= 1200
    # below the unlimited phase: the budgets the rest pays for, and the verdict rests on them
    short = deployed_phases(cfg, 160, 80, 160, 500)
    assert not short.unlimited and short.needed > 500 and short.budgets == [50] and short.runs_any
    assert short.most_queries <= 500 and short.least == short.most_queries  # the summaries and budget 50
    none = deployed_phases(cfg, 160, 80, 160, short.least - 1)
    assert not none.runs_any and none.skipped == [50, 200, 5000]  # no phase at all: no audit
    # without augmentation the plain view is the data itself, asked once for the summaries
    fixed = deployed_phases(cfg, 160, 80, 160, 500, fixed_plain=True)
    assert fixed.needed == fixed.most_queries == 240 and fixed.budgets == [50, 200, 5000]
    mixes = AuditConfig.model_validate(AUDIT | {"attacks": ["kd", "fm"], "attack_params": {"fm": {}}})
    assert deployed_phases(mixes, 160, 80, 160, 10_000, fixed_plain=True).needed == 240 + 2 * 160


def test_an_audit_through_the_callable_stays_within_the_cap(owner: tuple) -> None:
    data, model, recipe = owner
    control = train_model(recipe.model_copy(update={"seed": 1}), data).model
    cfg = AuditConfig.model_validate(AUDIT | {"query_budgets": [40, 100, 100_000]})
    cap = 1400
    phases = deployed_phases(cfg, len(data.x_train), len(data.x_test), len(data.x_train), cap)
    assert phases.budgets == [40, 100] and phases.skipped == [100_000]
    endpoint = Endpoint(model)
    teacher = AnsweringModel(endpoint, data.num_classes)
    cfg = cfg.model_copy(update={"query_budgets": phases.budgets})
    p = plan(cfg, teacher, data, control=control, evidence=False)
    report = assemble(p.summary, run_in_process(p))
    assert endpoint.rows == teacher.asked <= phases.most_queries <= cap
    assert p.challenges == {} and not report.evidence
    assert set(report.budgets["teacher"]) == {"40", "100"} and report.students["mlp"].attacks
    expected = (model_logits(model, data.x_test).argmax(-1) == data.y_test).float().mean() * 100
    assert abs(report.teacher.accuracy - float(expected)) < 1e-4
    # the same audit again, through a fresh callable: the same inputs, in the same order
    again = Endpoint(model)
    teacher2 = AnsweringModel(again, data.num_classes)
    p2 = plan(cfg, teacher2, data, control=control, evidence=False)
    assert p2.fingerprint == p.fingerprint
    assemble(p2.summary, run_in_process(p2))
    assert list(teacher2.known) == list(teacher.known) and again.rows == endpoint.rows


def test_a_cap_below_the_unlimited_phase_gives_a_verdict_at_its_largest_budget(owner: tuple) -> None:
    data, model, recipe = owner
    control = train_model(recipe.model_copy(update={"seed": 1}), data).model
    cfg = AuditConfig.model_validate(AUDIT | {"seeds": 2, "query_budgets": [40, 100, 100_000]})
    cap = 700
    phases = deployed_phases(cfg, len(data.x_train), len(data.x_test), len(data.x_train), cap)
    assert not phases.unlimited and phases.needed > cap and phases.budgets == [40]
    endpoint = Endpoint(model)
    teacher = AnsweringModel(endpoint, data.num_classes)
    cfg = cfg.model_copy(update={"query_budgets": phases.budgets})
    p = plan(cfg, teacher, data, control=control, evidence=False, no_unlimited=["teacher"])
    assert p.fingerprint != plan(cfg, teacher, data, control=control, evidence=False).fingerprint
    report = assemble(p.summary, run_in_process(p))
    assert endpoint.rows == teacher.asked <= phases.most_queries <= cap
    # the verdict is the budget phase's; the control (served by cmim, asked nothing) keeps its unlimited phase
    assert report.verdict_budget == 40
    at = report.budgets["teacher"]["40"].students["mlp"]
    assert report.students["mlp"].attacks["kd"].queries == at.attacks["kd"].queries == 40
    assert report.students["mlp"].verdict == at.verdict
    assert report.control.students["mlp"].attacks["kd"].queries > 40
    assert "the unlimited attacker was not measured" in report.verdict_reason
    assert any("unlimited attacker" in w and "40" in w for w in report.findings.why)
    assert report.served_safe_budget() in (0, 40)
