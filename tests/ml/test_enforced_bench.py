"""The enforced black box of `cmim bench paper` (ml.enforced_sim): the serving gate, the thief's keys, the
students' answers and the honest clients, on a tiny data set."""

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from ml.attacks import ATTACKS
from ml.audit.batches import Batch
from ml.audit.blackbox import BlackBox
from ml.audit.config import AuditConfig
from ml.audit.sources import CachedSource, LiveSource
from ml.audit.statement import enforcement_statement
from ml.audit.stats import summarise
from ml.audit.students import Run
from ml.data import Dataset, load_dataset
from ml.enforced_sim import (
    HONEST_KEYS,
    MODEL,
    RESENDERS,
    SENSORS,
    Attacker,
    Gate,
    Jitter,
    Replay,
    attackers,
    enforced_phase,
    enforced_record,
    enforced_summary,
    honest_requests,
    honest_standing,
    simulate,
    stream,
    train_attackers,
)
from ml.enforcement import Standing, first_exhausted
from ml.monitor import MonitorConfig, calibrate
from ml.oracle import OutputMode
from ml.resume import Kept


@pytest.fixture(scope="module")
def data() -> Dataset:
    return load_dataset("mnist1d", num_train=200, num_test=400)


def _attacker(epochs: int = 1) -> Attacker:
    cfg = AuditConfig(epochs=epochs, seeds=1, students=["mlp"], attacks=["hard_label"], device="cpu")
    return Attacker(
        "hard_label", lambda: Run("hard_label", "mlp", "enforced", ATTACKS.get("hard_label")(10, None)), cfg
    )


def _ref(data: Dataset):  # noqa: ANN202
    return calibrate(data.x_test[:200], MonitorConfig(), 0)


def test_a_request_is_answered_whole_or_refused_whole() -> None:
    assert first_exhausted([None, 10], [5, 4], 6) is None
    assert first_exhausted([None, 10], [5, 4], 7) == 1
    assert first_exhausted([3, 10], [3, 0], 1) == 0


def test_a_keys_successor_starts_when_it_is_out_of_budget(data: Dataset) -> None:
    a = _attacker()
    one = simulate(Gate(_ref(data), 64), a, data, 0, 1, [])
    assert one == {"samples": 64, "queries": 64, "keys_stopped": 1}
    # two keys: the second takes over the batch the first could not finish
    two = simulate(Gate(_ref(data), 64), a, data, 0, 2, [])
    assert two["samples"] == 128 and two["keys_stopped"] == 2
    # more keys than the stream needs: the whole schedule (200 samples), the last key still admitted
    many = simulate(Gate(_ref(data), 64), a, data, 0, 16, [])
    assert many["samples"] == 200 and many["keys_stopped"] == 3


def test_a_suspended_key_gets_no_answers_and_its_successor_does(data: Dataset) -> None:
    gate = Gate(_ref(data), None)
    x = data.x_test[:4]
    assert gate.ask("attacker-0", x)
    gate.book.put(MODEL, "attacker-0", Standing("suspended", "1", datetime.now(UTC)))
    assert not gate.ask("attacker-0", x) and gate.room("attacker-0") == 0
    assert gate.used["attacker-0"] == 4  # the refused request was not counted
    # the monitor itself suspends a key sending near-duplicates (hits, not repeats)
    base = data.x_test[:1]
    tau = gate.ref.tau
    answered = 0
    for i in range(200):
        noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(i))
        x = base + 0.3 * tau * noise / noise.norm()
        answered += gate.ask("attacker-1", x)
    assert gate.standing("attacker-1") is not None and gate.standing("attacker-1").suspended
    assert answered < 200 and gate.acted["attacker-1"].suspended


def test_students_train_only_on_the_answered_queries(data: Dataset) -> None:
    a = _attacker()
    gate = Gate(_ref(data), 50)
    sent: list[torch.Tensor] = []
    ask = gate.ask

    def recording(key: str, x: torch.Tensor) -> bool:
        ok = ask(key, x)
        if ok and key.startswith("attacker-"):
            sent.append(x)
        return ok

    gate.ask = recording  # type: ignore[method-assign]
    got = simulate(gate, a, data, 3, 3, [])
    assert got["samples"] == 150
    # the student's training set (the audit's budget phase with the answered count) is what was answered
    run = a.run()
    cached = CachedSource(LiveSource([run], data, {}, a.cfg, 3), got["samples"], 3)
    assert torch.equal(cached.views["plain"], torch.cat(sent))


def test_honest_resenders_and_sensors_are_not_held(data: Dataset) -> None:
    requests = honest_requests(data, 0)
    keys = {k for k, _ in requests}
    assert len(keys) == HONEST_KEYS
    gate = Gate(_ref(data), None)
    for key, x in requests:
        assert gate.ask(key, x)
    held = honest_standing(gate)
    assert held == {"suspended": 0, "limited": 0}
    # the resenders' second and third sends are repeats: not counted by the monitor
    resender = f"honest-{HONEST_KEYS - RESENDERS - SENSORS}"
    sends = sum(k == resender for k, _ in requests)
    assert gate.monitor.keys[resender].queries == sends // 3


def test_jitter_keeps_each_query_past_the_radius(data: Dataset) -> None:
    jitter = Jitter(tau=1.0, bank=64)
    x = data.x_train[:8].repeat(4, 1, 1)  # every input four times: all near-duplicates
    out = jitter(Batch(y=torch.zeros(len(x)), views={"mixup_edge": x.clone()})).views["mixup_edge"]
    flat = out.reshape(len(out), -1)
    for i in range(1, len(flat)):
        nearest = torch.linalg.vector_norm(flat[:i] - flat[i], dim=1).min()
        assert nearest >= 1.25 - 1e-4


def test_enforced_summary_without_a_phase_is_empty() -> None:
    assert set(enforced_summary(None).values()) == {None}


def test_every_report_says_what_the_policy_adds_from_the_recorded_measurement(tmp_path: Path) -> None:
    missing = enforcement_statement(tmp_path / "none.json")
    assert "not yet measured" in missing
    row = {"margin": -1.5, "margin_se": 0.4, "significant_holm": False, "queries": {"mean": 900.0}}
    report = {
        "benchmark": {"dataset": "mnist1d"},
        "config": {"seeds": 2},
        "enforced": {
            "keys": [1, 16, 256],
            "budget": 1000,
            "honest": {"suspended": 0, "limited": 1, "keys": 200},
            "rows": {"fm_edge K=256": row, "kd K=1": row | {"margin": -3.0, "queries": {"mean": 1000.0}}},
        },
    }
    record = enforced_record(report, "cmim bench paper --quick", "abc1234", indicative=True)
    assert record["worst"] == "fm_edge K=256" and record["enforced_queries"] == 1000.0
    assert record["honest_limited"] == 0.5 and record["keys"] == 256
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(record))
    text = enforcement_statement(path)
    assert "up to 256 keys" in text and "stayed below the LS student" in text and "abc1234" in text
    assert "indicative" in text
    row["margin"], row["significant_holm"] = 0.8, True
    path.write_text(json.dumps(enforced_record(report, "cmim bench paper", "abc1234", indicative=False)))
    text = enforcement_statement(path)
    assert "did not all stay below" in text and "fm_edge K=256" in text and "significantly after Holm" in text


def test_students_trained_over_two_workers_give_the_numbers_of_one(data: Dataset) -> None:
    """The enforced phase simulates first and then trains each distinct student once: over two spawned
    workers (one thread each) its rows equal those of one process at one thread."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(data.x_train[0].numel(), 10))
    box = BlackBox([teacher], OutputMode(kind="label"))
    cfg = AuditConfig(epochs=1, seeds=2, students=["mlp"], attacks=["hard_label"], device="cpu")
    ls = {"ls": {"acc_best": summarise([99.0, 98.0]), "acc_last": summarise([99.0, 98.0])}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = enforced_phase(cfg, data, box, 50, ls, keys=(1, 4), aware=False, workers=1, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    two = enforced_phase(cfg, data, box, 50, ls, keys=(1, 4), aware=False, workers=2, log=lambda _: None)
    assert set(one["rows"]) == {"hard_label K=1", "hard_label K=4"}
    assert one["rows"]["hard_label K=4"]["queries"]["mean"] == 200  # four keys of 50 rows each
    assert {n: r["acc_best"] for n, r in one["rows"].items()} == {
        n: r["acc_best"] for n, r in two["rows"].items()
    }


def test_attackers_of_one_stream_train_together_as_each_would_alone(data: Dataset) -> None:
    """Attackers that send the same stream and got the same answers (kd, hard_label, dkd on the plain view)
    train in one lockstep: each student's accuracy is the one it gets trained alone."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(data.x_train[0].numel(), 10))
    box = BlackBox([teacher], OutputMode(kind="label"))
    cfg = AuditConfig(
        epochs=2,
        seeds=1,
        students=["mlp"],
        attacks=["kd", "hard_label", "fm", "fm_edge"],
        attack_params={"kd": {"T": 4}},
        device="cpu",
    )
    by_stream = {a.name: a.stream_key for a in attackers(cfg, data, 0)}
    assert by_stream["kd"] == by_stream["hard_label"] != by_stream["fm"]
    assert by_stream["slow"] == by_stream["fm_edge"] and by_stream["jitter"] == "jitter"
    together = train_attackers(cfg, data, box, 0, ["kd", "hard_label"], 120, True)
    alone = [train_attackers(cfg, data, box, 0, [n], 120, True)[0] for n in ("kd", "hard_label")]
    flat = lambda pairs: [acc for pair in pairs for acc in pair]  # noqa: E731
    assert flat(together) == pytest.approx(flat(alone), abs=1e-6)
    assert together[0] != together[1]  # two students, not one copied


def test_students_kept_are_read_back_and_not_trained_again(data: Dataset, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(data.x_train[0].numel(), 10))
    box = BlackBox([teacher], OutputMode(kind="label"))
    cfg = AuditConfig(epochs=1, seeds=2, students=["mlp"], attacks=["hard_label"], device="cpu")
    ls = {"ls": {"acc_best": summarise([99.0, 98.0]), "acc_last": summarise([99.0, 98.0])}}
    kept = Kept(tmp_path)
    first_logs: list[str] = []
    first = enforced_phase(cfg, data, box, 50, ls, keys=(1, 4), aware=False, log=first_logs.append, kept=kept)
    pieces = list((tmp_path / "enforced").glob("*.json"))
    assert len(pieces) == 4  # two seeds x two sample counts
    assert len(list((tmp_path / "simulations").glob("*.json"))) == 2  # two seeds x one attacker, every K
    assert first["keys"] == [1, 4]
    logs: list[str] = []
    again = enforced_phase(cfg, data, box, 50, ls, keys=(1, 4), aware=False, log=logs.append, kept=kept)
    assert again == first
    assert "enforced: 2 of 2 attackers' simulations kept" in logs and not any("simulated" in m for m in logs)
    students = [m for m in logs if " student " in m]
    assert len(students) == 4 and all(m.endswith("(kept)") for m in students)
    # another per-key budget is another experiment: nothing of it is kept yet
    other: list[str] = []
    enforced_phase(cfg, data, box, 60, ls, keys=(1,), aware=False, log=other.append, kept=kept)
    assert not any(m.endswith("(kept)") for m in other)


def test_a_stream_drawn_once_replays_what_drawing_it_again_gives(data: Dataset) -> None:
    """One jitter stream drawn once and replayed to each K gives each K what a stream of its own gives."""
    cfg = AuditConfig(epochs=2, seeds=1, students=["mlp"], attacks=["hard_label"], device="cpu")
    a = next(x for x in attackers(cfg, data, 0) if x.name == "jitter")
    replay = Replay(stream(a, data, 0))
    requests = honest_requests(data, 0)
    for k in (1, 2, 16):  # the first pass stops early: later ones draw the rest
        alone = simulate(Gate(_ref(data), 64), a, data, 0, k, requests)
        assert simulate(Gate(_ref(data), 64), a, data, 0, k, requests, replay) == alone
    assert len(replay.drawn) == sum(1 for _ in stream(a, data, 0))
    assert all(torch.equal(x, y) for x, y in zip(replay, stream(a, data, 0), strict=True))
