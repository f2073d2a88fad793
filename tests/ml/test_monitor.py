"""The extraction monitor: near-duplicate hits, CUSUMs per key and per model, and its simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.data import load_dataset
from ml.monitor import ModelMonitor, MonitorConfig, QueryBank, Reference, calibrate, suspect_keys
from ml.monitor_sim import fm_edge_stream, simulate


@pytest.fixture(scope="module")
def data():  # noqa: ANN201
    return load_dataset("mnist1d", num_train=300, num_test=1200)


def test_calibration_sets_tau_at_the_honest_quantile(data) -> None:  # noqa: ANN001
    cfg = MonitorConfig(bank=400, quantile=0.02)
    ref = calibrate(data.x_test, cfg, seed=1)
    assert ref.tau > 0 and ref.calibration["bank_used"] == 400
    assert abs(ref.calibration["honest_hit_rate"] - 0.02) < 0.01
    assert ref.p0 == pytest.approx(0.02)  # the bank is as large as the calibration bank
    assert Reference.from_json(ref.to_json()) == ref
    with pytest.raises(ValueError, match="at least 20"):
        calibrate(data.x_test[:10], cfg)


def test_attack_queries_hit_the_bank_far_more_often_than_honest_ones(data) -> None:  # noqa: ANN001
    ref = calibrate(data.x_test[:600], MonitorConfig(bank=1024), seed=0)
    honest_bank, attack_bank = QueryBank(ref), QueryBank(ref)
    honest = honest_bank.hits(data.x_test[600:]).mean()
    attack = np.concatenate([attack_bank.hits(x) for x in fm_edge_stream(data, 1500, seed=0)])
    # the first epoch (300 queries) has no earlier copy of its inputs; later epochs do
    assert attack[:300].mean() < 0.1
    assert attack[600:].mean() > 5 * max(honest, ref.p0 / 2)


def test_a_bank_holds_at_most_its_size_and_tests_duplicates_within_a_batch() -> None:
    ref = Reference(MonitorConfig(bank=16, dim=4), input_size=8, seed=0, tau=0.5, p0=0.01)
    bank = QueryBank(ref)
    x = torch.randn(40, 8) * 10
    assert not bank.hits(x[:20]).any()
    assert bank.filled == 16
    assert bank.test(x[19:20]).repeats.all()  # still in the bank: found again
    assert not bank.test(x[:1]).repeats.any()  # pushed out
    assert bank.test(torch.cat([x[30:31], x[30:31]])).repeats.tolist() == [False, True]


def test_cusum_alerts_on_a_key_splitting_attacker_and_names_no_honest_key() -> None:
    rng = np.random.default_rng(0)
    cfg, p0 = MonitorConfig(), 0.02
    ref = Reference(cfg, input_size=40, seed=0, tau=1.0, p0=p0)
    monitor, alerts = ModelMonitor(cfg, p0), []
    for step in range(400):
        for k in range(50):  # honest keys: hits at the honest rate
            alerts += monitor.record(f"honest-{k}", 2, h := int(rng.binomial(2, p0)), ref.llr(2, h))
        key = f"attacker-{step % 16}"  # the attacker: 16 keys, 30 % near-duplicates
        alerts += monitor.record(key, 8, h := int(rng.binomial(8, 0.3)), ref.llr(8, h))
    named = {k["key_id"] for a in alerts for k in a.keys}
    # 7 % of the traffic: the model's test is diluted by the honest keys, each attacker key's is not
    assert len(named) >= 12 and all(k.startswith("attacker-") for k in named)
    assert len(monitor.keys) == 66


def test_honest_traffic_alone_raises_nothing() -> None:
    rng = np.random.default_rng(1)
    cfg, p0 = MonitorConfig(), 0.02
    ref = Reference(cfg, input_size=40, seed=0, tau=1.0, p0=p0)
    monitor = ModelMonitor(cfg, p0)
    for _ in range(2000):
        for k in range(50):
            h = int(rng.binomial(1, p0))
            assert not monitor.record(k, 1, h, ref.llr(1, h))


def test_suspects_are_keys_with_improbably_many_hits() -> None:
    keys = [
        {"key_id": "a", "statistic": 1.0, "queries": 100, "hits": 30},
        {"key_id": "b", "statistic": 9.0, "queries": 100, "hits": 3},
        {"key_id": "c", "statistic": 0.0, "queries": 5, "hits": 0},
    ]
    assert [k["key_id"] for k in suspect_keys(keys, 0.02, 1e-4)] == ["a"]


def test_simulation_alerts_on_the_16_key_attacker_and_flags_no_honest_key(data) -> None:  # noqa: ANN001
    out = simulate(data, seed=0, queries=3000, splits=(16,))
    honest_only, split16 = out["rows"]
    assert honest_only["keys"] == 0 and honest_only["alerts"] == 0
    assert split16["queries_to_alert"] is not None and split16["queries_to_alert"] < 3000
    assert split16["honest_keys_flagged"] == 0


def test_a_repeat_is_neither_a_hit_nor_counted_nor_kept() -> None:
    ref = Reference(MonitorConfig(bank=16, dim=8, repeat_radius=0.1), input_size=8, seed=0, tau=1.0, p0=0.01)
    bank = QueryBank(ref)
    x = torch.randn(1, 8) * 10
    v = torch.randn(1, 8)
    v /= float(np.linalg.norm(v.numpy() @ bank.proj))  # a step of projected length 1 (= tau)
    first = bank.test(x)
    assert first.counted == 1 and not first.hits.any() and bank.filled == 1
    # the same input again, and with a jitter inside the repeat radius: no evidence, and not kept
    again = bank.test(torch.cat([x, x + 0.05 * v, x - 0.05 * v]))
    assert again.repeats.all() and not again.hits.any() and again.counted == 0 and bank.filled == 1
    # a variation beyond the radius but within tau is a hit, as a thief's mixed query is
    near = bank.test(x + 0.5 * v)
    assert near.hits.all() and not near.repeats.any() and near.counted == 1 and bank.filled == 2
