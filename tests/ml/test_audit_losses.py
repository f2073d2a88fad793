"""Batched loss calls are the same arithmetic: one call on k students' stacked rows, times k, equals
the sum of k calls, for every attack marked row-separable and for label smoothing."""

import pytest
import torch
import torch.nn.functional as F

from ml.attacks import ATTACKS, AttackContext
from ml.audit.losses import smoothed_ce


@pytest.mark.parametrize("key", [k for k, cls in ATTACKS.items() if cls.row_separable])
def test_stacked_call_equals_the_sum_of_single_calls(key: str) -> None:
    g = torch.Generator().manual_seed(0)
    k, n, c = 3, 16, 10
    attack = ATTACKS.get(key)(c, None)
    logits = {v: torch.randn(k, n, c, generator=g) for v in attack.views}
    answers = {v: torch.softmax(3 * torch.randn(k, n, c, generator=g), -1) for v in attack.views}
    targets = torch.randint(0, c, (n,), generator=g)
    ctx = AttackContext(epoch=3, epochs=10, num_classes=c)
    single = sum(
        sum(
            attack(
                {v: z[i] for v, z in logits.items()}, {v: a[i] for v, a in answers.items()}, targets, ctx
            ).values()
        )
        for i in range(k)
    )
    stacked = {v: z.flatten(0, 1) for v, z in logits.items()}
    served = {v: a.flatten(0, 1) for v, a in answers.items()}
    batched = k * sum(attack(stacked, served, targets.repeat(k), ctx).values())
    assert batched == pytest.approx(float(single), rel=1e-5)


def test_smoothed_ce_is_pytorch_label_smoothing() -> None:
    g = torch.Generator().manual_seed(1)
    z, y, eps = (
        torch.randn(4, 32, 10, generator=g),
        torch.randint(0, 10, (32,), generator=g),
        [0.0, 0.1, 0.3, 0.5],
    )
    got = smoothed_ce(z, y, torch.tensor(eps)).mean(-1)
    want = torch.stack([F.cross_entropy(z[i], y, label_smoothing=e) for i, e in enumerate(eps)])
    torch.testing.assert_close(got, want)
