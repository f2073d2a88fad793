"""Attack suite: golden values against independent reference code, and the properties the audit relies on.

The references below are written with numpy and explicit loops from the papers' formulas; they do
not call anything in ml.attacks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ml.attacks import ATTACKS, AttackContext, attack_infos, make_attack, rows
from ml.attacks.base import temper
from ml.attacks.topk import default_k
from ml.oracle import OutputMode, apply_output_mode
from ml.registry import UnknownNameError

B, C, D = 4, 5, 3
CTX = AttackContext(epoch=4, epochs=30, num_classes=C)
TOL = {"rel": 1e-5, "abs": 1e-5}

# ---------------------------------------------------------------- fixed inputs

_rng = np.random.default_rng(1234)
Z = {v: _rng.normal(size=(B, C)) * 2.0 for v in ("plain", "strong", "mixup")}
_TEACHER_LOGITS = {v: _rng.normal(size=(B, C)) * 3.0 for v in ("plain", "strong", "mixup")}
# views added later draw after the others, so the fixed inputs above stay what they were
for _v in ("mixup_edge", "noise"):
    Z[_v] = _rng.normal(size=(B, C)) * 2.0
    _TEACHER_LOGITS[_v] = _rng.normal(size=(B, C)) * 3.0
FEATURES = _rng.normal(size=(B, D))
# Classes 1 and 3 are absent and class 2 appears twice (matters for avg).
Y = np.array([0, 2, 2, 4])


def np_softmax(z: np.ndarray, T: float = 1.0) -> np.ndarray:
    e = np.exp(z / T - (z / T).max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_topk(p: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(p)
    for i in range(p.shape[0]):
        keep = np.argsort(-p[i])[:k]
        out[i, keep] = p[i, keep] / p[i, keep].sum()
    return out


def served(kind: str) -> dict[str, np.ndarray]:
    """The teacher answers per view: full probabilities, or top-3 (two exact zeros per row)."""
    probs = {v: np_softmax(z) for v, z in _TEACHER_LOGITS.items()}
    return probs if kind == "probs" else {v: np_topk(p, 3) for v, p in probs.items()}


def np_temper(p: np.ndarray, T: float) -> np.ndarray:
    q = np.zeros_like(p)
    np.power(p, 1.0 / T, out=q, where=p > 0)
    return q / q.sum(axis=-1, keepdims=True)


def ref_kl(p: np.ndarray, q: np.ndarray) -> float:
    """batchmean KL(p || q) with explicit loops, skipping p = 0."""
    total = 0.0
    for i in range(p.shape[0]):
        for c in range(p.shape[1]):
            if p[i, c] > 0:
                total += p[i, c] * math.log(p[i, c] / q[i, c])
    return total / p.shape[0]


def ref_ce(z: np.ndarray, y: np.ndarray) -> float:
    logp = np.log(np_softmax(z))
    return float(-np.mean([logp[i, y[i]] for i in range(len(y))]))


def ref_kd(p: np.ndarray, z: np.ndarray, T: float) -> float:
    return T**2 * ref_kl(np_temper(p, T), np_softmax(z, T))


def ref_nontarget(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = p.copy()
    for i in range(len(y)):
        out[i, y[i]] = 0.0
        out[i] /= out[i].sum()
    return out


def ref_pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def ref_zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=-1, keepdims=True)) / (x.std(axis=-1, ddof=1, keepdims=True) + 1e-7)


def ref_gram_gap(ps: np.ndarray, pt: np.ndarray) -> tuple[float, float]:
    batch = float(((pt @ pt.T - ps @ ps.T) ** 2).sum()) / ps.shape[0]
    cls = float(((pt.T @ pt - ps.T @ ps) ** 2).sum()) / ps.shape[1]
    return batch, cls


def reference(key: str, p: dict[str, np.ndarray], attack: torch.nn.Module) -> float:
    z, y, pt = Z["plain"], Y, p["plain"]
    ce = ref_ce(z, y)
    if key == "kd":
        return 0.1 * ce + 0.9 * ref_kd(pt, z, 4.0)
    if key == "hard_label":
        return ref_ce(z, pt.argmax(axis=1))
    if key == "topk":  # C = 5 < 50 -> k = 5 = C: keeping every class leaves the served answer as is
        return 0.1 * ce + 0.9 * ref_kd(np_topk(pt, 5), z, 4.0)
    if key == "dkd":
        T, w = 4.0, (CTX.epoch + 1) / 20
        p_t, p_s = np_temper(pt, T), np_softmax(z, T)
        tckd = 0.0
        for i in range(B):
            g = y[i]
            bt = np.array([p_t[i, g], 1 - p_t[i, g]])
            bs = np.array([p_s[i, g], 1 - p_s[i, g]])
            tckd += sum(bt[j] * math.log(bt[j] / bs[j]) for j in range(2) if bt[j] > 0) / B
        nckd = ref_kl(ref_nontarget(p_t, y), ref_nontarget(p_s, y))
        return ce + w * T**2 * (1.0 * tckd + 8.0 * nckd)
    if key == "dist":
        tau = 4.0
        p_t, p_s = np_temper(pt, tau), np_softmax(z, tau)
        inter = np.mean([1 - ref_pearson(p_s[i], p_t[i]) for i in range(B)])
        intra = np.mean([1 - ref_pearson(p_s[:, c], p_t[:, c]) for c in range(C)])
        return ce + tau**2 * (inter + intra)
    if key == "lskd":
        T = 2.0
        target = np_softmax(ref_zscore(np.log(np.maximum(pt, 1e-8))), T)
        return 0.1 * ce + 9.0 * T**2 * ref_kl(target, np_softmax(ref_zscore(z), T))
    if key == "mlkd":
        total = 0.1 * (ce + ref_ce(Z["strong"], y))
        for v in ("plain", "strong"):
            for T in (2.0, 3.0, 4.0, 5.0, 6.0):
                p_t, p_s = np_temper(p[v], T), np_softmax(Z[v], T)
                batch, cls = ref_gram_gap(p_s, p_t)
                total += 0.9 * (T**2 * ref_kl(p_t, p_s) + batch + cls)
        return total
    if key == "ctkd":
        T = 1.0 + 20.0 / (1.0 + math.exp(-1.0))
        return 0.1 * ce + 0.9 * ref_kd(pt, z, T)
    if key == "wttm":
        gamma, p_s = 0.25, np_softmax(z)
        total = 0.0
        for i in range(B):
            powered = np.array([pt[i, c] ** gamma if pt[i, c] > 0 else 0.0 for c in range(C)])
            norm = powered.sum()
            total += norm * ref_kl((powered / norm)[None], p_s[i][None]) / B
        return ce + total
    if key == "nkd":
        T, gamma = 3.0, 3.5
        p_s = np_softmax(z)
        target = -np.mean([pt[i, y[i]] * math.log(p_s[i, y[i]]) for i in range(B)])
        n_t, n_s = ref_nontarget(np_temper(pt, T), y), ref_nontarget(np_softmax(z, T), y)
        nontarget = -np.mean(
            [sum(n_t[i, c] * math.log(n_s[i, c]) for c in range(C) if c != y[i]) for i in range(B)]
        )
        return ce + target + gamma * T**2 * nontarget
    if key == "avg":
        T = 4.0
        p_t = np_temper(pt, T)
        centroid = np.stack([p_t[[j for j in range(B) if y[j] == y[i]]].mean(axis=0) for i in range(B)])
        return 0.1 * ce + 0.9 * T**2 * ref_kl(centroid, np_softmax(z, T))
    if key == "mkd":
        T = 4.0
        u, v, d = (t.detach().numpy() for t in (attack.u, attack.v, attack.d))
        logits = u @ v.T + np.diag(d)
        markov = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        target = np_temper(pt, T) @ markov
        return 0.1 * ce + 0.9 * T**2 * ref_kl(target, np_softmax(z, T))
    if key == "skeptical":
        T = 4.0
        w1, b1, w2, b2 = (t.detach().numpy() for t in attack.aux.parameters())
        h = np.maximum(FEATURES @ w1.T + b1, 0.0) @ w2.T + b2
        final = 0.1 * ce + 0.9 * T**2 * ref_kl(np_softmax(h, T), np_softmax(z, T))
        aux = 0.1 * ref_ce(h, y) + 0.9 * ref_kd(pt, h, T)
        return final + aux
    if key == "fm":
        return ref_kd(p["mixup"], Z["mixup"], 4.0)
    if key in ("fm_edge", "fm_noise"):  # fm at T 1 on its own view, nothing else
        view = ATTACKS.get(key).views[0]
        return ref_kd(p[view], Z[view], 1.0)
    raise AssertionError(f"no reference for {key}")


# ---------------------------------------------------------------- helpers


def build(key: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    attack = make_attack(key, C, **overrides)
    if attack.needs_features:
        attack.setup(D)
    attack = attack.double()
    if key == "mkd":  # a generic matrix, not the near-diagonal initial one
        with torch.no_grad():
            for param in attack.parameters():
                param.copy_(torch.randn_like(param))
    return attack


def inputs(
    teacher_np: dict[str, np.ndarray], grad: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    student = {v: torch.tensor(z, requires_grad=grad) for v, z in Z.items()}
    student["features"] = torch.tensor(FEATURES, requires_grad=grad)
    teacher = {v: torch.tensor(p) for v, p in teacher_np.items()}
    return student, teacher, torch.tensor(Y)


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(terms.values())).sum()


def value(terms: dict[str, torch.Tensor]) -> float:
    return float(total(terms).detach())


# ---------------------------------------------------------------- golden values


@pytest.mark.parametrize("kind", ["probs", "topk"])
@pytest.mark.parametrize("key", ATTACKS.names())
def test_golden_value(key: str, kind: str) -> None:
    attack = build(key)
    teacher = served(kind)
    student, teacher_t, targets = inputs(teacher)
    assert value(attack(student, teacher_t, targets, CTX)) == pytest.approx(
        reference(key, teacher, attack), **TOL
    )


def test_topk_golden_with_k_below_classes() -> None:
    attack = build("topk", k=2)
    student, teacher, targets = inputs(served("probs"))
    top2 = np_topk(served("probs")["plain"], 2)
    expected = 0.1 * ref_ce(Z["plain"], Y) + 0.9 * ref_kd(top2, Z["plain"], 4.0)
    assert value(attack(student, teacher, targets, CTX)) == pytest.approx(expected, **TOL)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("T", [1.0, 4.0, 10.0, 20.0])
def test_kd_vanishes_when_student_matches_teacher(T: float) -> None:
    p = torch.tensor(served("probs")["plain"])
    # log p up to a per-sample constant: the attacker effectively holds the teacher's logits.
    z = torch.log(p) + torch.arange(B, dtype=p.dtype)[:, None]
    terms = make_attack("kd", C, T=T, a=1.0)({"plain": z}, {"plain": p}, torch.tensor(Y), CTX)
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-10)
    assert value(terms) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("kind", ["probs", "topk", "label"])
@pytest.mark.parametrize("key", ATTACKS.names())
def test_finite_scalars_and_gradients_reach_the_student(key: str, kind: str) -> None:
    teacher_np = served("probs")
    if kind != "probs":
        mode = OutputMode(kind=kind, k=2)
        teacher_np = {v: apply_output_mode(torch.tensor(p), mode).numpy() for v, p in teacher_np.items()}
    attack = build(key)
    student, teacher, targets = inputs(teacher_np, grad=True)
    terms = attack(student, teacher, targets, CTX)
    assert terms
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    total(terms).backward()
    used = list(attack.views) + (["features"] if attack.needs_features else [])
    for view in used:
        grad = student[view].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, view
    for view in set(student) - set(used):
        assert student[view].grad is None, view
    for param in attack.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()


def ctkd_kd_term(attack: torch.nn.Module, theta: torch.Tensor) -> torch.Tensor:
    """The CTKD loss as a plain function of theta, without the gradient-reversal layer."""
    student, teacher, targets = inputs(served("probs"))
    p = attack.params
    T = p.t_min + p.t_range * torch.sigmoid(theta)
    p_t = temper(teacher["plain"], T)
    kl = (torch.xlogy(p_t, p_t) - p_t * F.log_softmax(student["plain"] / T, dim=-1)).sum(-1).mean()
    return p.kd_weight * T**2 * kl


@pytest.mark.parametrize("epoch, strength", [(0, 0.0), (5, 0.5), (10, 1.0), (25, 1.0)])
def test_ctkd_temperature_gradient_is_reversed_and_ramped(epoch: int, strength: float) -> None:
    attack = build("ctkd")
    student, teacher, targets = inputs(served("probs"))
    total(attack(student, teacher, targets, AttackContext(epoch=epoch, epochs=30, num_classes=C))).backward()
    theta = attack.theta.detach().clone().requires_grad_(True)
    (true_grad,) = torch.autograd.grad(ctkd_kd_term(attack, theta), theta)
    assert float(true_grad) != 0.0
    assert float(attack.theta.grad) == pytest.approx(-strength * float(true_grad), rel=1e-9, abs=1e-12)
    assert attack.current_temperature == pytest.approx(1 + 20 / (1 + math.exp(-1.0)))


def test_mkd_matrix_is_row_stochastic_starts_near_identity_and_learns() -> None:
    attack = make_attack("mkd", C)
    matrix = attack.matrix()
    assert torch.allclose(matrix.sum(1), torch.ones(C))
    assert torch.allclose(matrix.diagonal(), torch.full((C,), 0.9))
    z = torch.tensor(Z["plain"], dtype=torch.float32)
    p = torch.tensor(served("probs")["plain"], dtype=torch.float32)
    total(attack({"plain": z}, {"plain": p}, torch.tensor(Y), CTX)).backward()
    # U starts multiplied by V = 0, so only V and d move on the first step (LoRA-style start).
    assert attack.v.grad.abs().sum() > 0 and attack.d.grad.abs().sum() > 0
    generic = build("mkd")
    student, teacher, targets = inputs(served("probs"))
    total(generic(student, teacher, targets, CTX)).backward()
    assert all(param.grad.abs().sum() > 0 for param in (generic.u, generic.v, generic.d))


def test_hard_label_copies_the_argmax_of_label_only_answers() -> None:
    probs = served("probs")["plain"]
    labels_only = apply_output_mode(torch.tensor(probs), OutputMode(kind="label"))
    z = torch.tensor(Z["plain"])
    attacker_labels = torch.tensor((probs.argmax(axis=1) + 1) % C)  # deliberately all wrong
    terms = make_attack("hard_label", C)({"plain": z}, {"plain": labels_only}, attacker_labels, CTX)
    assert value(terms) == pytest.approx(ref_ce(Z["plain"], probs.argmax(axis=1)), **TOL)
    assert value(terms) != pytest.approx(ref_ce(Z["plain"], attacker_labels.numpy()), **TOL)


def test_fm_copies_labels_under_label_only_answers() -> None:
    probs = served("probs")["mixup"]
    one_hot = apply_output_mode(torch.tensor(probs), OutputMode(kind="label"))
    student = {"mixup": torch.tensor(Z["mixup"])}
    terms = make_attack("fm", C)(student, {"mixup": one_hot}, torch.tensor(Y), CTX)
    # The tempered one-hot stays one-hot: T^2 times the CE of the student at T on the teacher's labels.
    expected = 16.0 * ref_ce(Z["mixup"] / 4.0, probs.argmax(axis=1))
    assert value(terms) == pytest.approx(expected, **TOL)


def test_skeptical_final_head_never_sees_the_teacher() -> None:
    attack = build("skeptical")
    grads = []
    for kind in ("probs", "topk"):
        student, teacher, targets = inputs(served(kind), grad=True)
        total(attack(student, teacher, targets, CTX)).backward()
        grads.append(student["plain"].grad)
    assert torch.equal(grads[0], grads[1])


def test_skeptical_needs_setup() -> None:
    attack = make_attack("skeptical", C)
    assert attack.needs_features
    student, teacher, targets = inputs(served("probs"))
    with pytest.raises(RuntimeError, match="setup"):
        attack(student, teacher, targets, CTX)


def test_temper_keeps_zeros_and_one_hot_and_matches_softmax() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    for T in (0.5, 1.0, 4.0):
        q = temper(p, T)
        assert torch.equal(q == 0, p == 0)
        assert torch.allclose(q.sum(1), torch.ones(2, dtype=torch.float64))
        assert torch.equal(q[1], p[1])
        assert torch.allclose(q[0, :3], torch.softmax(torch.log(p[0, :3]) / T, dim=0))


def test_topk_default_k_and_renormalisation() -> None:
    assert [default_k(c) for c in (5, 10, 49, 50, 100, 200)] == [5, 5, 5, 5, 10, 20]
    assert make_attack("topk", 100).k == 10
    with pytest.raises(ValueError, match="exceeds"):
        make_attack("topk", C, k=C + 1)
    # topk on full answers == kd on hand-made top-2 renormalised answers.
    student, teacher, targets = inputs(served("probs"))
    by_topk = total(make_attack("topk", C, k=2)(student, teacher, targets, CTX))
    hand = {"plain": torch.tensor(np_topk(served("probs")["plain"], 2))}
    by_kd = total(make_attack("kd", C)(student, hand, targets, CTX))
    assert float(by_topk) == pytest.approx(float(by_kd), rel=1e-12)


def test_rows() -> None:
    kd_rows = rows("kd")
    assert [name for name, _ in kd_rows] == ["kd_t1", "kd_t4", "kd_t10", "kd_t20"]
    assert [params.T for _, params in kd_rows] == [1.0, 4.0, 10.0, 20.0]
    assert all(params.a == 0.9 for _, params in kd_rows)
    assert [(name, params.T) for name, params in rows("fm")] == [("fm", 4.0), ("fm_t1", 1.0)]
    for key in ATTACKS.names():
        if key not in ("kd", "fm"):  # fm_edge and fm_noise: one row each, named by the key
            ((name, params),) = rows(key)
            assert name == key and params == ATTACKS.get(key).Params()


def test_unknown_attack_lists_choices() -> None:
    for call in (lambda: make_attack("nope", C), lambda: rows("nope")):
        with pytest.raises(UnknownNameError) as err:
            call()
        assert all(key in str(err.value) for key in ATTACKS.names())


def test_unknown_or_invalid_parameter_rejected() -> None:
    with pytest.raises(ValueError, match="temperature") as err:
        make_attack("kd", C, temperature=4)
    assert "T" in str(err.value) and "a" in str(err.value)
    with pytest.raises(ValueError):
        make_attack("kd", C, T=-1.0)
    with pytest.raises(ValueError):
        make_attack("mlkd", C, temperatures=[2.0, 0.0])


def test_attack_infos_cover_the_registry() -> None:
    infos = {info.key: info for info in attack_infos()}
    assert list(infos) == ATTACKS.names()
    assert infos["kd"].defaults == {"T": 4.0, "a": 0.9}
    assert infos["fm"].views == ("mixup",)
    assert infos["fm_edge"].views == ("mixup_edge",) and infos["fm_noise"].views == ("noise",)
    assert infos["mlkd"].views == ("plain", "strong")
    assert all(info.paper for info in infos.values())
