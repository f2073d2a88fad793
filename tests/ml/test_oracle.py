"""The black-box oracle: output modes, query counting, the budget, and eval-mode/no-grad answering."""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ml.oracle import Oracle, OutputMode, QueryBudgetExceeded, apply_output_mode

C = 7


def probs(n: int = 6, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, C, generator=g) * scale, dim=1)


def teacher() -> nn.Module:
    """Dropout and batch norm make train-mode answers detectable (random, and they move statistics)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, C))


def test_probs_mode_serves_the_probabilities() -> None:
    p = probs()
    assert torch.equal(apply_output_mode(p, OutputMode()), p)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_keeps_k_renormalised(k: int) -> None:
    p = probs()
    before = p.clone()
    out = apply_output_mode(p, OutputMode(kind="topk", k=k))
    assert torch.equal(p, before)  # pure
    assert torch.allclose(out.sum(1), torch.ones(len(p)))
    assert ((out == 0).sum(1) == C - k).all()
    for row_p, row_out in zip(p, out, strict=True):
        kept = set(torch.argsort(row_p, descending=True)[:k].tolist())
        assert set(torch.nonzero(row_out).flatten().tolist()) == kept
        idx = sorted(kept)
        assert torch.allclose(row_out[idx], row_p[idx] / row_p[idx].sum())


def test_topk_with_k_at_least_classes_is_identity() -> None:
    p = probs()
    assert torch.allclose(apply_output_mode(p, OutputMode(kind="topk", k=C + 3)), p)


def test_label_is_one_hot_of_argmax() -> None:
    p = probs()
    out = apply_output_mode(p, OutputMode(kind="label"))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert (out.sum(1) == 1).all()
    assert torch.equal(out.argmax(1), p.argmax(1))


@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_rounded_has_at_most_decimals_then_renormalises(decimals: int) -> None:
    p = probs(scale=1.0, seed=decimals)
    out = apply_output_mode(p, OutputMode(kind="rounded", decimals=decimals))
    assert torch.allclose(out.sum(1), torch.ones(len(p)))
    for row_p, row_out in zip(p.tolist(), out, strict=True):
        rounded = [round(v, decimals) for v in row_p]  # Python's decimal rounding as the reference
        for v in rounded:
            assert -Decimal(str(v)).as_tuple().exponent <= decimals
        # The served row is those rounded numbers, renormalised.
        expected = torch.tensor(rounded) / sum(rounded)
        assert torch.allclose(row_out, expected, atol=1e-6)


def test_rounded_all_zero_row_falls_back_to_label() -> None:
    # 7 nearly uniform classes: every probability < 0.5 rounds to 0 at 0 decimals.
    p = torch.softmax(torch.tensor([[0.1, 0.0, 0.2, 0.05, 0.0, 0.0, 0.0], [5.0, 0, 0, 0, 0, 0, 0]]), dim=1)
    out = apply_output_mode(p, OutputMode(kind="rounded", decimals=0))
    assert torch.equal(out[0], torch.nn.functional.one_hot(torch.tensor(2), C).float())
    assert torch.equal(out[1], torch.nn.functional.one_hot(torch.tensor(0), C).float())


def test_output_mode_validation() -> None:
    with pytest.raises(ValidationError):
        OutputMode(kind="logits")
    with pytest.raises(ValidationError):
        OutputMode(kind="topk", k=0)
    with pytest.raises(ValidationError):
        OutputMode(decimals=-1)
    with pytest.raises(ValidationError):
        OutputMode(kind="probs", temperature=2)


def test_oracle_counts_rows_and_answers_in_eval_mode_without_grad() -> None:
    model = teacher().train()
    stats = model[1].running_mean.clone()
    oracle = Oracle(model, OutputMode(kind="topk", k=3))
    assert not model.training
    x = torch.randn(5, 4)
    first = oracle(x)
    model.train()  # somebody else flips the shared module: the oracle still answers as deployed
    second = oracle(x)
    assert not model.training
    assert torch.equal(first, second)  # no dropout
    assert torch.equal(model[1].running_mean, stats)  # batch-norm statistics untouched
    assert not first.requires_grad and first.grad_fn is None
    assert first.dtype == torch.float32 and first.shape == (5, C)
    assert ((first == 0).sum(1) == C - 3).all()
    with torch.no_grad():
        expected = apply_output_mode(torch.softmax(model.eval()(x), dim=1), OutputMode(kind="topk", k=3))
    assert torch.allclose(first, expected)
    assert oracle.queries == 10
    oracle(torch.randn(1, 4))
    assert oracle.queries == 11


def test_budget_raises_before_crossing_and_states_numbers() -> None:
    oracle = Oracle(teacher(), budget=10)
    oracle(torch.randn(4, 4))
    oracle(torch.randn(4, 4))
    assert oracle.remaining == 2
    with pytest.raises(QueryBudgetExceeded) as err:
        oracle(torch.randn(3, 4))
    message = str(err.value)
    assert "10" in message and "8" in message and "3" in message
    assert (err.value.budget, err.value.used, err.value.requested) == (10, 8, 3)
    assert oracle.queries == 8  # the refused batch was not answered or counted
    oracle(torch.randn(2, 4))  # exactly reaching the budget is allowed
    assert oracle.queries == 10
    with pytest.raises(QueryBudgetExceeded):
        oracle(torch.randn(1, 4))


def test_no_budget_means_unlimited() -> None:
    oracle = Oracle(teacher())
    assert oracle.remaining is None
    oracle(torch.randn(64, 4))
    assert oracle.queries == 64
    with pytest.raises(ValueError):
        Oracle(teacher(), budget=-1)
