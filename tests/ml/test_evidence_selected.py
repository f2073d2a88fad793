"""The selected challenge chosen on one half of the seeds and measured on the other, in words when it cannot
work; the null's other architectures (which families by default, the owner's, their records)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.audit import AuditConfig
from ml.audit.records import EvidenceRecord
from ml.data import load_dataset
from ml.evidence.heldout import evidence_words, selected_section
from ml.evidence.nulls import default_null_families, sklearn_null
from ml.evidence.selected import MIN_POINTS, pack_bits, pool_kinds, select, unpack_bits
from ml.evidence.verify import evidence_note, null_families, null_from_report

POOL, SEEDS = 600, 6


def population(rng: np.random.Generator, follow: float) -> tuple[dict, dict, dict]:
    """Agreement bits of LS recipes (3 per family), a logistic null and fm knockoffs, per seed. On the first
    third of the pool independent models agree with the teacher 30 % of the time and knockoffs `follow`."""
    idio = np.arange(POOL) < POOL // 3

    def model(p_idio: float) -> np.ndarray:
        return np.where(idio, rng.random(POOL) < p_idio, rng.random(POOL) < 0.95)

    recipes = ["ls_0", "ls_0.1", "ls_0.2", "ls_mixup_0", "ls_mixup_0.1", "ls_mixup_0.2", "logistic"]
    negatives = {r: [[model(0.3)] for _ in range(SEEDS)] for r in recipes}
    families = {r: "logistic" if r == "logistic" else ("mixup" if "mixup" in r else "plain") for r in recipes}
    knockoffs = {("unlimited", "fm"): [model(follow) for _ in range(SEEDS)]}
    near = {("unlimited", "fm"): [True] * SEEDS}
    return negatives, families, knockoffs | {}, near


def test_a_discriminating_pool_is_chosen_on_even_seeds_measured_on_odd_ones_and_calls_the_teacher() -> None:
    negatives, families, knockoffs, near = population(np.random.default_rng(0), follow=0.95)
    sec = selected_section(negatives, families, knockoffs, near, 512)
    assert sec["works"] and sec["meets_target"], sec["reason"]
    assert sec["teacher"]["verdict"] == "copy" and sec["fpr"] == 0.0
    assert sec["tpr_near_ls_unlimited"] == 1.0 and sec["near_ls_unlimited"] == SEEDS // 2  # odd seeds only
    assert {f: len(v) for f, v in sec["negatives"].items()} == {"plain": 9, "mixup": 9, "logistic": 3}
    assert set(sec["fpr_by_family"]) == {"plain", "mixup", "logistic"}
    kept = np.array(sec["challenge"])
    assert (kept < POOL // 3).mean() > 0.9  # the idiosyncratic third, chosen by the evidence alone
    assert sec["reason"].startswith("Evidence works for this model")
    # measured on the held-out seeds: changing a held-out (odd) seed's bits changes the rates, not the choice
    flipped = {k: [b if s % 2 == 0 else ~b for s, b in enumerate(v)] for k, v in knockoffs.items()}
    again = selected_section(negatives, families, flipped, near, 512)
    assert again["challenge"] == sec["challenge"] and again["tpr_unlimited"] == 0.0


def test_a_pool_where_knockoffs_answer_like_independent_models_says_evidence_cannot_work() -> None:
    negatives, families, knockoffs, near = population(np.random.default_rng(1), follow=0.3)
    sec = selected_section(negatives, families, knockoffs, near, 512)
    assert not sec["works"] and not sec["meets_target"]
    assert sec["reason"].startswith("Evidence for this model cannot work: ")
    report = {"evidence": {"mechanisms": {"selected": {"teacher": {"mlp": sec}}}}}
    assert evidence_words(report["evidence"]) == sec["reason"]
    assert evidence_note(report) == {"evidence": sec["reason"]}  # what verify adds
    one_seed = {r: v[:1] for r, v in negatives.items()}
    sec1 = selected_section(one_seed, families, {k: v[:1] for k, v in knockoffs.items()}, near, 512)
    assert not sec1["works"] and "at least 2" in sec1["reason"]


def test_selection_follows_the_knockoffs_that_follow_the_teacher() -> None:
    rng = np.random.default_rng(2)
    idio = np.arange(POOL) < 100
    neg = {f"ls_{i}": [np.where(idio, rng.random(POOL) < 0.2, True)] for i in range(4)}  # one per recipe
    follower = [np.ones(POOL, bool) for _ in range(2)]
    like_independent = [neg["ls_0"][0].copy() for _ in range(4)]  # a label copy: looks independent
    kept, score = select(follower + like_independent, neg, 512)
    assert MIN_POINTS <= len(kept) and set(kept) <= set(range(100))
    assert (score[kept] == 1.0).all()  # the label copies took no part: only the followers' answers count
    bits = rng.random(POOL) < 0.5
    assert (unpack_bits(pack_bits(torch.from_numpy(bits)), POOL) == bits).all()
    assert pool_kinds(6) == ["mix", "mix", "perturbation", "perturbation", "boundary", "boundary"]


def test_null_families_by_default_and_by_the_owners_choice() -> None:
    assert default_null_families(["mlp"], (40,)) == []  # tabular: the zoo has no other student family
    assert default_null_families(["mlp"], (1, 40)) == ["cnn1d_small"]
    assert default_null_families(["mlp"], (3, 32, 32)) == ["cnn2d"]
    assert default_null_families(["cnn2d"], (3, 32, 32)) == ["mlp"]
    assert AuditConfig(null_archs=["logistic", "cnn1d_small"]).null_archs == ["logistic", "cnn1d_small"]
    with pytest.raises(ValueError, match="unknown null family 'gpt'.*logistic, forest"):
        AuditConfig(null_archs=["gpt"])
    # an earlier positional record (7 fields) and a new one (8) are both read
    old = EvidenceRecord.model_validate([None, None, "mlp", "ls_0", "fingerprint", "teacher", 0.5])
    new = EvidenceRecord.model_validate([*old.as_tuple()[:-1], "ff"])
    assert old.agrees is None and new.agrees == "ff"


def test_a_scikit_learn_null_is_seeded_and_the_widest_null_pools_every_family() -> None:
    data = load_dataset("mnist1d", num_train=400, num_test=200)
    a, acc = sklearn_null("logistic", data, 0)
    b, _ = sklearn_null("logistic", data, 0)
    c, _ = sklearn_null("logistic", data, 1)
    x = data.x_test
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x)) and 10 < acc <= 100
    plain, cnn = [0.5, 0.52, 0.48], [0.6, 0.62, 0.61, 0.6, 0.63]
    others = {"plain": plain, "cnn1d_small": cnn, "cnn2d": [0.9, 0.9]}
    rates = {"plain": 0.0, "cnn1d_small": 0.0, "cnn2d": 1.0}
    sec = {
        "negatives": {"plain": plain},
        "fpr": 0.0,
        "other_architectures": {"negatives": others, "fpr": 0.0, "fpr_by_family": rates},
    }
    report = {"evidence": {"points": 512, "mechanisms": {"fingerprint": {"teacher": {"mlp": sec}}}}}
    # a family of 2 would leave no test (t with one degree of freedom): its rate is reported, not pooled
    assert null_families(report, "fingerprint") == {"plain": plain, "cnn1d_small": cnn}
    null, _ = null_from_report(report, "fingerprint")
    assert set(null.families) == {"plain", "cnn1d_small"} and null.threshold() > 0.62
    # ... and verify, like the report's findings, says which architecture the null does not cover
    note = evidence_note(report)["evidence"]
    assert note.startswith("The null does not cover cnn2d (2 models, 100% called copies)")
    assert "cnn1d_small" not in note and evidence_words(report["evidence"]) == note


def test_a_null_familys_models_of_one_seed_are_held_out_together() -> None:
    """Records of several null models a seed (rows null, null_1, ...) reach the selection grouped by seed:
    chosen on the even seeds' models, measured on every model of the odd seeds."""
    from ml.evidence.audit import evidence_section
    from ml.evidence.registry import CHALLENGE_POINTS
    from ml.evidence.selected import pool_size

    rng, seeds, pool = np.random.default_rng(3), 4, pool_size(CHALLENGE_POINTS)
    idio = np.arange(pool) < pool // 3

    def hexed(p_idio: float) -> str:
        return pack_bits(torch.from_numpy(np.where(idio, rng.random(pool) < p_idio, rng.random(pool) < 0.95)))

    rows = [(None, "mlp", r, 0.3) for r in ("ls_0", "ls_0.1", "ls_0.2")]
    rows += [(None, "cnn1d_small", r, 0.3) for r in ("null", "null_1", "null_2")]
    rows += [("teacher", "mlp", "fm", 0.95)]
    records = [
        (None, teacher, arch, row, "selected", "teacher", 0.5, hexed(p))
        for _ in range(seeds)
        for teacher, arch, row, p in rows
    ]
    accuracy = {(None, teacher, arch, row): [80.0] * seeds for teacher, arch, row, _ in rows}
    sec = evidence_section(records, accuracy, {}, {"sha256": "0", "committed_at": "now"})
    sec = sec["mechanisms"]["selected"]["teacher"]["mlp"]
    assert sec["works"], sec["reason"]
    assert {f: len(v) for f, v in sec["negatives"].items()} == {"plain": 6, "cnn1d_small": 6}  # seeds 1, 3
    assert sec["fpr_by_family"]["cnn1d_small"] == 0.0 and sec["near_ls_unlimited"] == 2


def test_a_working_fingerprint_is_said_when_no_challenge_could_be_chosen() -> None:
    """No selected challenge, but the fingerprint works as verify tests it (its widest null where there is
    one): the report and verify do not say that evidence cannot work; a fingerprint that calls no knockoff
    against the widest null leaves the words as they were."""
    negatives, families, knockoffs, near = population(np.random.default_rng(1), follow=0.3)
    selected = selected_section(negatives, families, knockoffs, near, 512)
    assert not selected["works"]
    own = {"fpr": 0.0, "tpr_unlimited": 0.8, "negatives": {"plain": [0.5] * 5}}

    def report(fingerprint: dict) -> dict:
        mechanisms = {
            "selected": {"teacher": {"mlp": selected}},
            "fingerprint": {"teacher": {"mlp": fingerprint}},
        }
        return {"evidence": {"points": 512, "mechanisms": mechanisms}}

    works = report(own)
    words = evidence_words(works["evidence"])
    assert words.startswith("Evidence works for this model with the fingerprint: it calls 80% of the audit's")
    assert "could not be: on only" in words and evidence_note(works) == {}
    widest = {
        "fpr": 0.0,
        "tpr_unlimited": 0.0,
        "fpr_by_family": {"cnn1d": 0.0},
        "negatives": {"cnn1d": [0.8] * 5},
    }
    fails = report(own | {"other_architectures": widest})  # verify tests against the widest: no copy
    assert evidence_words(fails["evidence"]) == selected["reason"]
    assert evidence_note(fails) == {"evidence": selected["reason"]}
