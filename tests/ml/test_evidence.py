"""Evidence of theft: a knockoff made here is called a copy, independent models are not; the audit
measures every student; keyed answers change exactly their slab; the secret stays out of the report."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ml.audit import AuditConfig, plan, run_in_process, serve_box
from ml.audit.report import assemble
from ml.data import load_dataset
from ml.evidence import MECHANISMS, Null, NullModel, Secret, loo_fpr
from ml.evidence.verify import pack_challenge, predicted_labels, unpack_challenge, verdict
from ml.models import build_model
from ml.oracle import OutputMode
from ml.policy import FittedPolicy, PolicyConfig, fit_policy, serve
from ml.train import TrainConfig, train_model

DATA = {"num_train": 1000, "num_test": 1000}


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist1d", **DATA)


@pytest.fixture(scope="module")
def teacher(data):
    cfg = TrainConfig(dataset_params=DATA, arch="cnn1d_small", objective="ce", epochs=8, seed=0, device="cpu")
    return train_model(cfg, data).model.eval()


def student(data, seed: int, teacher=None, steps: int = 600) -> torch.nn.Module:
    """An MLP trained on the true labels (independent), or on the teacher's labels of mixed inputs (a
    label-only function-matching knockoff)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    m = build_model("mlp", data.input_shape, data.num_classes, mean=data.mean, std=data.std)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(steps):
        i = torch.randint(len(data.x_train), (128,), generator=g)
        x, y = data.x_train[i], data.y_train[i]
        if teacher is not None:
            lam = torch.rand(len(x), 1, 1, generator=g)
            x = lam * x + (1 - lam) * x[torch.randperm(len(x), generator=g)]
            with torch.no_grad():
                y = teacher(x).argmax(-1)
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_a_knockoff_is_called_a_copy_and_an_independent_model_is_not(data, teacher) -> None:
    secret = Secret.new()
    ch = MECHANISMS.get("fingerprint").challenge(teacher, None, data, secret, 256)
    assert ch is not None and len(ch.x) == 256
    assert unpack_challenge(pack_challenge(ch)).agreement(ch.labels) == 1.0
    negatives = [ch.agreement(predicted_labels(student(data, s), ch)) for s in range(1, 7)]
    null = Null.fit({"plain": negatives}, 256)
    knockoff = verdict(ch, predicted_labels(student(data, 10, teacher), ch), null, 0.0)
    independent = verdict(ch, predicted_labels(student(data, 11), ch), null, 0.0)
    assert knockoff["verdict"] == "copy" and knockoff["p_value"] < 0.01, knockoff
    assert independent["verdict"] == "not_shown", independent
    assert knockoff["agreement"] > independent["agreement"]
    # the same secret draws the same challenge; another secret another one
    again = MECHANISMS.get("fingerprint").challenge(teacher, None, data, secret, 256)
    other = MECHANISMS.get("fingerprint").challenge(teacher, None, data, Secret.new(), 256)
    assert torch.equal(again.x, ch.x) and not torch.equal(other.x, ch.x)


def test_null_model_p_values_and_threshold_agree() -> None:
    null = NullModel.fit([0.50, 0.52, 0.48, 0.51, 0.49], 512)
    assert null.p_value(null.threshold(0.01)) == pytest.approx(0.01)
    assert null.p_value(0.5) > 0.4 and null.p_value(0.9) < 1e-3
    with pytest.raises(ValueError, match="at least 2"):
        NullModel.fit([0.5], 512)
    # two families: the suspect must out-agree the more agreeing one
    both = Null.fit({"plain": [0.50, 0.52, 0.48, 0.51], "mixup": [0.20, 0.22, 0.21, 0.19]}, 512)
    assert both.p_value(0.45) > 0.5  # far above the mixup family, below the plain one: no evidence
    assert both.threshold() == Null.fit({"plain": [0.50, 0.52, 0.48, 0.51]}, 512).threshold()
    assert loo_fpr({"plain": [0.5, 0.52, 0.48, 0.51], "mixup": [0.2, 0.22, 0.21, 0.19]}, 512) == 0.0
    assert loo_fpr({"plain": [0.5, 0.52]}, 512) is None  # leaving one out leaves no family of 2


def test_keyed_answers_shift_exactly_the_slab_and_round_trip(data, teacher) -> None:
    cfg = PolicyConfig(keyed_fraction=0.05)
    with pytest.raises(ValueError, match="secret"):
        fit_policy(cfg, teacher, data.x_train, data.y_train, data.x_test[:500])
    fitted = fit_policy(cfg, teacher, data.x_train, data.y_train, data.x_test[:500], Secret.new())
    x = data.x_test[500:]
    logits = teacher(x).detach()
    probs = torch.softmax(logits, -1)
    served = serve(probs, logits, OutputMode(kind="label"), fitted, x=x)
    inside = fitted.keyed.inside(x)
    assert 0.01 < inside.float().mean() < 0.12  # about the 5 % asked for, on other clean inputs
    shifted = (probs.argmax(-1) + fitted.keyed.shift) % data.num_classes
    assert torch.equal(served.answer.argmax(-1), torch.where(inside, shifted, probs.argmax(-1)))
    assert torch.equal(served.altered, inside)
    again = FittedPolicy.from_tensors(cfg, fitted.to_tensors())
    assert torch.equal(again.keyed.inside(x), inside)
    # the challenge: clean inputs moved into the slab, labelled with the shifted label
    ch = MECHANISMS.get("keyed").challenge(teacher, fitted, data, Secret.new(), 64)
    assert bool(fitted.keyed.inside(ch.x).all())


def test_the_audit_measures_evidence_on_every_student_and_commits_to_the_secret(data, teacher) -> None:
    secret = Secret.new()
    cfg = AuditConfig(
        epochs=2, seeds=2, attacks=["hard_label", "fm"], attack_params={"fm": {}}, ls_eps=[0.0, 0.1],
        query_budgets=[], control=False, output_mode=OutputMode(kind="label"), device="cpu",
    )  # fmt: skip
    keyed = serve_box([teacher], OutputMode(kind="label"), PolicyConfig(keyed_fraction=0.01), data, secret)
    p = plan(cfg, teacher, data, protections={"keyed": keyed}, secret=secret)
    report = assemble(p.summary, run_in_process(p)).to_json()
    ev = report["evidence"]
    assert ev["commitment"] == secret.commitment()
    fp = ev["mechanisms"]["fingerprint"]["teacher"]["mlp"]
    assert {f: len(v) for f, v in fp["negatives"].items()} == {"plain": 4, "mixup": 4}  # 2 seeds x 2 eps
    assert set(fp["phases"]["unlimited"]) == {"hard_label", "fm"}
    assert all(len(r["p"]) == 2 for r in fp["phases"]["unlimited"].values())
    assert set(ev["mechanisms"]["keyed"]) == {"serving", "keyed"}  # only the keyed box carries keyed evidence
    assert ev["mechanisms"]["keyed"]["keyed"]["mlp"]["honest_cost"]["altered"] > 0
    assert secret.value.hex() not in json.dumps(report)
