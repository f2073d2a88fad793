"""Serving policies: snapping, off-manifold detectors, actions, PRADA, honest-user cost, storage, the Oracle.

The detector tests use an MLP trained for 5 epochs on scikit-learn's digits (~97 % test accuracy, ~2 s):
teachers trained on mnist1d's 300-sample split reach only ~30 % accuracy, and no detector separates
anything for a teacher that weak (their outputs are flat everywhere).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from ml.cmi import model_logits
from ml.data import load_dataset
from ml.oracle import Oracle, OutputMode, apply_output_mode
from ml.policy import (
    FittedPolicy,
    PolicyConfig,
    QueryHistory,
    expected_calibration_error,
    fit_policy,
    honest_cost,
    query_scores,
    serve,
)
from ml.train import TrainConfig, train_model

C = 4


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def model(data):
    cfg = TrainConfig(dataset="digits", arch="mlp", objective="ce", epochs=5, seed=0, device="cpu")
    return train_model(cfg, data).model.eval()


def two_class_mixes(x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Half-half mixes of two inputs of different classes."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(len(x), (n,), generator=g), torch.randint(len(x), (n,), generator=g)
    keep = y[i] != y[j]
    return 0.5 * x[i[keep]] + 0.5 * x[j[keep]]


def flag_rate(policy: FittedPolicy, model, x: torch.Tensor) -> float:
    logits = model_logits(model, x)
    scores = query_scores(policy.config.detector, logits.softmax(-1), logits, policy.centroids)
    return float((scores > policy.threshold).float().mean())


# ---------------------------------------------------------------- snapping and centroids


def test_snapping_serves_the_centroid_of_the_predicted_class(model, data) -> None:
    policy = fit_policy(PolicyConfig(snap=True), model, data.x_train, data.y_train, data.x_train)
    assert torch.equal(policy.centroids.argmax(1), torch.arange(10))  # a centroid never changes a label
    assert torch.allclose(policy.centroids.sum(1), torch.ones(10))
    logits = model_logits(model, data.x_test)
    probs = logits.softmax(-1)
    served = serve(probs, logits, OutputMode(), policy)
    assert torch.equal(served.answer, policy.centroids[probs.argmax(-1)])
    assert torch.equal(served.answer.argmax(-1), probs.argmax(-1))
    assert served.altered.all() and not served.refused.any()
    # Under label-only serving a snapped answer is the same one-hot: nothing is altered.
    labelled = serve(probs, logits, OutputMode(kind="label"), policy)
    assert torch.equal(labelled.answer, apply_output_mode(probs, OutputMode(kind="label")))
    assert not labelled.altered.any()


def test_centroids_are_means_over_correctly_classified_fit_samples(model, data) -> None:
    policy = fit_policy(PolicyConfig(), model, data.x_train, data.y_train, data.x_train)
    probs = model_logits(model, data.x_train).softmax(-1)
    for c in range(10):
        mask = (data.y_train == c) & (probs.argmax(-1) == c)
        assert torch.allclose(policy.centroids[c], probs[mask].mean(0), atol=1e-6)


# ---------------------------------------------------------------- per-query detectors


@pytest.mark.parametrize("detector", ["confidence", "energy", "cluster_kl"])
def test_detector_flags_fpr_of_calibration_and_far_more_off_manifold(model, data, detector: str) -> None:
    cfg = PolicyConfig(detector=detector, fpr=0.05)
    policy = fit_policy(cfg, model, data.x_train, data.y_train, data.x_train)
    assert abs(flag_rate(policy, model, data.x_train) - 0.05) <= 2 / len(data.x_train)
    mixes = two_class_mixes(data.x_train, data.y_train, 1000)
    noise = torch.rand(500, *data.input_shape, generator=torch.Generator().manual_seed(1))
    assert flag_rate(policy, model, mixes) >= 0.3  # measured 0.55-0.75
    assert flag_rate(policy, model, noise) >= 0.5  # uniform noise images: measured 0.9-1.0


def test_scores_follow_their_formulas() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.5, 0.4, 0.3, 0.2]])
    probs = logits.softmax(-1)
    centroids = torch.eye(C) * 0.6 + 0.1
    assert torch.allclose(query_scores("confidence", probs, logits, centroids), 1 - probs.max(-1).values)
    assert torch.allclose(query_scores("energy", probs, logits, centroids), -torch.logsumexp(logits, -1))
    q = centroids[probs.argmax(-1)]
    kl = (probs * (probs.log() - q.log())).sum(-1)
    assert torch.allclose(query_scores("cluster_kl", probs, logits, centroids), kl, atol=1e-6)
    with pytest.raises(ValueError):
        query_scores("prada", probs, logits, centroids)


# ---------------------------------------------------------------- actions


def hand_policy(**cfg) -> FittedPolicy:
    """Confidence detector with threshold 0.5: rows whose top probability is below 0.5 are suspicious."""
    centroids = torch.full((C, C), 0.1) + torch.eye(C) * 0.6
    return FittedPolicy(PolicyConfig(detector="confidence", **cfg), centroids, threshold=0.5)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor(
        [
            [0.85, 0.05, 0.05, 0.05],  # confident: served plainly
            [0.30, 0.40, 0.20, 0.10],  # flat: suspicious
            [0.05, 0.05, 0.80, 0.10],
            [0.25, 0.25, 0.20, 0.30],  # flat
        ]
    )
    return probs, probs.log()


SUSPICIOUS = torch.tensor([False, True, False, True])


def test_refuse_serves_zero_rows_and_marks_them() -> None:
    probs, logits = batch()
    for mode in (OutputMode(), OutputMode(kind="topk", k=2), OutputMode(kind="rounded", decimals=0)):
        served = serve(probs, logits, mode, hand_policy(action="refuse"))
        assert torch.equal(served.refused, SUSPICIOUS) and torch.equal(served.altered, SUSPICIOUS)
        assert (served.answer[SUSPICIOUS] == 0).all()  # no NaN from an all-zero top-k
        plain = apply_output_mode(probs, mode)
        assert torch.equal(served.answer[~SUSPICIOUS], plain[~SUSPICIOUS])
    assert torch.allclose(served.score, 1 - probs.max(-1).values)


def test_label_and_snap_actions() -> None:
    probs, logits = batch()
    policy = hand_policy(action="label")
    served = serve(probs, logits, OutputMode(), policy)
    assert torch.equal(served.answer[SUSPICIOUS], torch.eye(C)[probs[SUSPICIOUS].argmax(-1)])
    assert torch.equal(served.answer[~SUSPICIOUS], probs[~SUSPICIOUS])
    assert torch.equal(served.altered, SUSPICIOUS) and not served.refused.any()
    policy = hand_policy(action="snap")
    served = serve(probs, logits, OutputMode(), policy)
    assert torch.equal(served.answer[SUSPICIOUS], policy.centroids[probs[SUSPICIOUS].argmax(-1)])
    # snap=True: every row is a centroid; the action then cannot serve more than that
    served = serve(probs, logits, OutputMode(), hand_policy(snap=True, action="perturb"), generator=None)
    assert torch.equal(served.answer[~SUSPICIOUS], policy.centroids[probs[~SUSPICIOUS].argmax(-1)])
    assert served.altered.all()


def test_perturb_keeps_argmax_changes_probabilities_and_is_seeded() -> None:
    probs, logits = batch()
    policy = hand_policy(action="perturb", perturb_scale=2.0)

    def run(seed: int) -> torch.Tensor:
        return serve(
            probs, logits, OutputMode(), policy, generator=torch.Generator().manual_seed(seed)
        ).answer

    a, b, other = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert torch.equal(a.argmax(-1), probs.argmax(-1))
    assert torch.allclose(a.sum(-1), torch.ones(len(a)))
    assert not torch.allclose(a[SUSPICIOUS], probs[SUSPICIOUS], atol=1e-3)
    assert torch.equal(a[~SUSPICIOUS], probs[~SUSPICIOUS])
    # many draws: the label survives even when the noise swamps the probabilities
    g = torch.Generator().manual_seed(2)
    many = probs[SUSPICIOUS].repeat(500, 1)
    out = serve(
        many, many.log(), OutputMode(), hand_policy(action="perturb", perturb_scale=10.0), generator=g
    )
    assert torch.equal(out.answer.argmax(-1), many.argmax(-1))
    # then the output mode formats the perturbed answer
    topk = serve(
        probs, logits, OutputMode(kind="topk", k=2), policy, generator=torch.Generator().manual_seed(0)
    )
    assert ((topk.answer > 0).sum(-1) == 2).all()


def test_no_policy_and_empty_policy_serve_the_output_mode() -> None:
    probs, logits = batch()
    mode = OutputMode(kind="topk", k=2)
    for policy in (None, FittedPolicy(PolicyConfig(), torch.eye(C))):
        served = serve(probs, logits, mode, policy)
        assert torch.equal(served.answer, apply_output_mode(probs, mode))
        assert not served.refused.any() and not served.altered.any() and not served.score.any()


# ---------------------------------------------------------------- PRADA


N_STREAM = 600


def prada_flags(model, x: torch.Tensor, batch_size: int = 50) -> tuple[bool, float | None]:
    """Send x as one key, in order; (flagged, the key's last Shapiro-Wilk W)."""
    history = QueryHistory()
    pred = model_logits(model, x).argmax(-1)
    cfg = PolicyConfig(detector="prada")
    for i in range(0, len(x), batch_size):
        history.update(
            x[i : i + batch_size], pred[i : i + batch_size], cfg.prada_min_history, cfg.prada_delta
        )
    return history.flagged, history.w


def natural_stream(data) -> torch.Tensor:
    x = torch.cat([data.x_train, data.x_test])
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))][:N_STREAM]


def test_prada_flags_synthetic_and_repeated_streams_not_natural_ones(model, data) -> None:
    natural = natural_stream(data)
    g = torch.Generator().manual_seed(3)
    # Papernot-style synthetic queries: 30 seeds, each perturbed 20 times by +-0.1 steps
    seeds = natural[:30].repeat(N_STREAM // 30, 1, 1, 1)
    synthetic = seeds + 0.1 * torch.sign(torch.randn(seeds.shape, generator=g))
    synthetic = synthetic[torch.randperm(N_STREAM, generator=g)]
    repeated = natural[: N_STREAM // 2].repeat(2, 1, 1, 1)  # the same samples asked twice
    flagged, w = prada_flags(model, natural)
    assert not flagged and w > 0.9
    assert prada_flags(model, synthetic)[0]
    assert prada_flags(model, repeated)[0]


def test_prada_does_not_flag_a_mixup_stream_on_this_data(model, data) -> None:
    """Measured, not wished: mixed inputs' nearest-neighbour distances look as normal as natural ones.

    W ~ 0.98 for uniform mixup against ~0.975 for natural digits; on mnist1d (CNN teacher) a mixup
    stream stays above 0.9 for 6 passes over 4,000 samples. PRADA catches fm by its repeats, not
    by the mixing.
    """
    natural = torch.cat([data.x_train, data.x_test])
    g = torch.Generator().manual_seed(4)
    i, j = torch.randint(len(natural), (2, N_STREAM), generator=g)
    lam = torch.rand(N_STREAM, 1, 1, 1, generator=g)
    flagged, w = prada_flags(model, lam * natural[i] + (1 - lam) * natural[j])
    assert not flagged and w > 0.95


def test_prada_key_stays_flagged_and_needs_history(model, data) -> None:
    policy = fit_policy(PolicyConfig(detector="prada"), model, data.x_train, data.y_train, data.x_train)
    assert policy.threshold is None
    oracle = Oracle(model, policy=policy)
    natural = natural_stream(data)
    twice = torch.cat([natural[:300], natural[:300]])
    refused_batches = []
    for i in range(0, len(twice), 50):
        oracle(twice[i : i + 50])
        refused_batches.append(bool(oracle.last.refused.all()))
        assert oracle.last.refused.all() or not oracle.last.refused.any()  # the whole batch or none
    assert refused_batches[0] is False and refused_batches[-1] is True
    first = refused_batches.index(True)
    assert all(refused_batches[first:])
    assert oracle.history.flagged
    oracle(natural[300:350])  # fresh natural samples: still refused, the key is flagged
    assert oracle.last.refused.all()
    assert oracle.refused_total == 50 * (len(refused_batches) - first + 1)
    fresh = Oracle(model, policy=policy)  # another key starts clean
    fresh(natural[300:350])
    assert not fresh.last.refused.any()
    probs, logits = batch()
    with pytest.raises(ValueError):
        serve(probs, logits, OutputMode(), policy)


# ---------------------------------------------------------------- honest-user cost


def test_honest_cost_of_an_empty_policy_is_nothing(model, data) -> None:
    logits = model_logits(model, data.x_test)
    acc = 100.0 * float((logits.argmax(-1) == data.y_test).float().mean())
    ece = expected_calibration_error(logits.softmax(-1), data.y_test)
    empty = fit_policy(PolicyConfig(), model, data.x_train, data.y_train, data.x_train)
    for policy in (None, empty):
        cost = honest_cost(model, OutputMode(), policy, data.x_test, data.y_test, batch_size=100)
        assert cost["accuracy"] == pytest.approx(acc)
        assert cost["ece"] == pytest.approx(ece, abs=1e-6)
        assert cost["refused"] == 0 and cost["altered"] == 0
    snapped = fit_policy(PolicyConfig(snap=True), model, data.x_train, data.y_train, data.x_train)
    cost = honest_cost(model, OutputMode(), snapped, data.x_test, data.y_test)
    assert cost["accuracy"] == pytest.approx(acc) and cost["altered"] == 100 and cost["refused"] == 0


def test_honest_cost_counts_refused_as_wrong(model, data) -> None:
    cfg = PolicyConfig(detector="confidence", fpr=0.2)
    policy = fit_policy(cfg, model, data.x_train, data.y_train, data.x_train)
    oracle = Oracle(model, policy=policy)
    answers = oracle(data.x_test)
    refused = oracle.last.refused
    assert refused.any()
    right = (answers.argmax(-1) == data.y_test) & ~refused
    cost = honest_cost(model, OutputMode(), policy, data.x_test, data.y_test)
    assert cost["accuracy"] == pytest.approx(100.0 * float(right.float().mean()))
    assert cost["refused"] == pytest.approx(100.0 * float(refused.float().mean()))
    assert cost["ece"] == pytest.approx(expected_calibration_error(answers[~refused], data.y_test[~refused]))


def test_expected_calibration_error() -> None:
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(torch.eye(2)[labels], labels) == 0  # confident and right
    assert expected_calibration_error(torch.eye(2)[1 - labels], labels) == pytest.approx(100)
    # all at confidence 0.75 in one bin, half right: |0.5 - 0.75| = 25 %
    p = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(p, labels) == pytest.approx(25)


# ---------------------------------------------------------------- storage and the Oracle


@pytest.mark.parametrize("detector", ["none", "energy", "prada"])
def test_to_tensors_round_trip_through_safetensors_and_json(
    model, data, tmp_path: Path, detector: str
) -> None:
    cfg = PolicyConfig(snap=True, detector=detector, action="label", fpr=0.02)
    policy = fit_policy(cfg, model, data.x_train, data.y_train, data.x_train)
    save_file(policy.to_tensors(), tmp_path / "policy.safetensors")
    (tmp_path / "policy.json").write_text(cfg.model_dump_json())
    back = FittedPolicy.from_tensors(
        PolicyConfig.model_validate_json((tmp_path / "policy.json").read_text()),
        load_file(tmp_path / "policy.safetensors"),
    )
    assert back.config == policy.config and back.threshold == policy.threshold
    assert torch.equal(back.centroids, policy.centroids)
    a, b = Oracle(model, policy=policy), Oracle(model, policy=back)
    assert torch.equal(a(data.x_test), b(data.x_test))


def test_from_tensors_rejects_mismatches() -> None:
    with pytest.raises(ValueError):
        FittedPolicy.from_tensors(PolicyConfig(detector="energy"), {"centroids": torch.eye(3)})
    with pytest.raises(ValueError):
        FittedPolicy.from_tensors(PolicyConfig(), {"centroids": torch.eye(3), "threshold": torch.zeros(1)})
    with pytest.raises(ValueError):
        FittedPolicy.from_tensors(PolicyConfig(), {"centroids": torch.ones(3, 4)})


def test_oracle_with_a_policy_counts_refused_and_altered(model, data) -> None:
    cfg = PolicyConfig(detector="cluster_kl", fpr=0.1, action="refuse")
    policy = fit_policy(cfg, model, data.x_train, data.y_train, data.x_train)
    oracle = Oracle(model, OutputMode(kind="topk", k=3), budget=len(data.x_test), policy=policy)
    refused = altered = 0
    for i in range(0, len(data.x_test), 100):
        out = oracle(data.x_test[i : i + 100])
        assert torch.equal(out, oracle.last.answer)
        refused += int(oracle.last.refused.sum())
        altered += int(oracle.last.altered.sum())
    assert oracle.refused_total == refused == altered == oracle.altered_total > 0
    assert oracle.queries == len(data.x_test) and oracle.remaining == 0
    plain = Oracle(model)
    plain(data.x_test)
    assert plain.refused_total == plain.altered_total == 0 and not plain.last.altered.any()


def test_oracle_perturbation_is_seeded_per_oracle(model, data) -> None:
    cfg = PolicyConfig(detector="confidence", fpr=0.3, action="perturb")
    policy = fit_policy(cfg, model, data.x_train, data.y_train, data.x_train)
    x = data.x_test[:200]
    a, b, c = (
        Oracle(model, policy=policy, seed=5),
        Oracle(model, policy=policy, seed=5),
        Oracle(model, policy=policy, seed=6),
    )
    first, second, third = a(x), b(x), c(x)
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert a.altered_total > 0 and a.refused_total == 0
    assert not torch.equal(a(x), first)  # the generator moves on between calls


def test_policy_config_validation() -> None:
    for field in PolicyConfig.model_fields.values():
        assert field.description
    with pytest.raises(ValidationError):
        PolicyConfig(detector="mahalanobis")
    with pytest.raises(ValidationError):
        PolicyConfig(fpr=0)
    with pytest.raises(ValidationError):
        PolicyConfig(snapping=True)
    with pytest.raises(ValidationError):
        PolicyConfig(prada_min_history=200, prada_memory=100)


def test_a_policy_in_words() -> None:
    assert PolicyConfig().words() == []
    words = PolicyConfig(snap=True, detector="prada", action="label", keyed_fraction=0.05).words()
    assert words == ["snapped to class centroids", "prada detector -> label", "keyed answers on 5% of inputs"]
