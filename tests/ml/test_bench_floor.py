"""The arithmetic floor's FLOP count: two counted epochs, extrapolated, equal the whole phase counted."""

import pytest
from torch.utils.flop_counter import FlopCounterMode

from ml.attacks import ATTACKS
from ml.audit import AuditConfig, Run, train_lockstep
from ml.oracle import Oracle
from ml.speed import phase_flops


@pytest.mark.parametrize("budget", [None, 150])
def test_phase_flops_extrapolates_two_epochs_to_the_whole_phase(data, teachers, budget) -> None:
    teacher, _ = teachers
    cfg = AuditConfig(epochs=5, seeds=1, control=False, batch_size=64, device="cpu")

    def train(on_epoch) -> None:
        runs = [Run("ls", "mlp", eps=0.1)] if budget is None else []
        attacks = {k: ATTACKS.get(k)(data.num_classes, None) for k in ("kd", "fm")}
        runs += [Run(k, "mlp", teacher="t", attack=a) for k, a in attacks.items()]
        train_lockstep(runs, data, {"t": Oracle(teacher)}, cfg, 0, on_epoch=on_epoch, budget=budget)

    counter, at_epochs = FlopCounterMode(display=False), []
    with counter:  # the whole phase, read at the end of each epoch (what follows the last is not counted)
        train(lambda epoch, epochs: at_epochs.append(counter.get_total_flops()))
    stopped: list[int] = []
    estimate = phase_flops(lambda cb: train(lambda e, n: (stopped.append(e), cb(e, n))))
    assert len(at_epochs) > 2 and stopped == [1, 2]  # counted two epochs, not the phase
    assert at_epochs[1] > at_epochs[0] > 0
    assert estimate == pytest.approx(at_epochs[-1], rel=1e-9)
