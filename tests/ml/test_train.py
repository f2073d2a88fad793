"""The trainer, objectives, checkpoints and `cmim train`: determinism, resume, round trips."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.cli import app
from ml.data import load_dataset
from ml.objectives import make_objective
from ml.train import TrainConfig, TrainingCancelled, train_model

SMALL = {"num_train": 300, "num_test": 200}


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist1d", **SMALL)


def cfg(**kw) -> TrainConfig:
    base = {"dataset_params": SMALL, "arch": "mlp", "epochs": 2, "batch_size": 64, "device": "cpu"}
    return TrainConfig(**(base | kw))


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_same_seed_same_weights_different_seed_differs(data) -> None:
    a = train_model(cfg(objective="cmim", seed=3), data)
    b = train_model(cfg(objective="cmim", seed=3), data)
    c = train_model(cfg(objective="cmim", seed=4), data)
    assert torch.equal(weights(a.model), weights(b.model))
    assert [h.losses for h in a.history] == [h.losses for h in b.history]
    assert not torch.equal(weights(a.model), weights(c.model))


def test_resume_after_cancel_equals_uninterrupted_run(data, tmp_path: Path) -> None:
    run = cfg(objective="cmim", epochs=3, objective_params={"centroids": "ema"})
    full = train_model(run, data)
    state = tmp_path / "state.pt"

    def cancel_at_epoch_2(report) -> None:
        if report.epoch == 2:
            raise TrainingCancelled

    with pytest.raises(TrainingCancelled):
        train_model(run, data, state_path=state, on_epoch=cancel_at_epoch_2)
    seen: list[int] = []
    resumed = train_model(run, data, state_path=state, on_epoch=lambda r: seen.append(r.epoch))
    assert seen == [2, 3]  # epoch 1 came from the state file; the cancelled epoch 2 is redone
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    assert torch.equal(weights(resumed.model), weights(full.model))


@pytest.mark.parametrize(
    "objective,params",
    [
        ("ce", {}),
        ("ls", {"eps": 0.2}),
        ("cmim", {}),
        ("cmim", {"sampled": 3, "weights": "uniform", "warmup_epochs": 1, "surrogate_weight": 0.5}),
        ("cmim", {"centroids": "ema", "lam": 3}),
        ("cmim", {"mixed": 1.0}),
        ("nasty", {}),
    ],
)
def test_every_objective_trains_and_reports(data, objective: str, params: dict) -> None:
    r = train_model(cfg(objective=objective, objective_params=params), data)
    assert len(r.history) == 2 and all(
        torch.isfinite(torch.tensor(list(h.losses.values()))).all() for h in r.history
    )
    assert set(r.history[-1].cmi) == {"1", "4", "16"}
    assert r.meta.metrics["cmi_test"].keys() == {"1", "4", "16"}
    assert r.best_acc >= r.last_acc > 10


def test_cmim_lowers_high_temperature_cmi(data) -> None:
    ce = train_model(cfg(objective="ce", epochs=30), data)
    cmim = train_model(cfg(objective="cmim", epochs=30, objective_params={"lam": 10}), data)
    assert cmim.meta.metrics["cmi_train"]["16"] < 0.75 * ce.meta.metrics["cmi_train"]["16"]


def test_cmim_on_mixed_inputs_lowers_their_cmi(data) -> None:
    from ml.cmi import cmi_by_temperature, model_logits

    g = torch.Generator().manual_seed(0)
    x = data.x_test
    perm, lam = torch.randperm(len(x), generator=g), torch.rand(len(x), 1, 1, generator=g)
    mixes = lam * x + (1 - lam) * x[perm]

    def cmi_on_mixes(mixed: float) -> float:
        r = train_model(cfg(objective="cmim", epochs=30, objective_params={"lam": 10, "mixed": mixed}), data)
        assert ("cmi_mixed" in r.history[-1].losses) == (mixed > 0)
        z = model_logits(r.model, mixes)
        return cmi_by_temperature(z, z.argmax(-1), (16.0,))["16"]  # a mix is clustered by its prediction

    assert cmi_on_mixes(10.0) < 0.6 * cmi_on_mixes(0.0)


def test_cmim_mixed_term_is_the_cmi_of_the_mixed_logits_by_prediction() -> None:
    from ml.objectives import DEFAULT_GRID, StepContext, cmi_loss

    torch.manual_seed(0)
    z, zm, y = torch.randn(16, 5), torch.randn(16, 5), torch.randint(0, 5, (16,))
    objective = make_objective("cmim", {"lam": 2.0, "mixed": 3.0})
    assert objective.needs_mixed and not make_objective("cmim").needs_mixed
    terms = objective(z, y, StepContext(1.0, 2, 5, mixed_logits=zm))
    temps = torch.tensor(DEFAULT_GRID)
    weights = temps**2 / (temps**2).sum()
    expected = 2.0 * 3.0 * cmi_loss(zm, zm.argmax(-1), temps, weights)
    assert float(terms["cmi_mixed"]) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="mixed inputs"):
        objective(z, y, StepContext(1.0, 2, 5))


def test_bad_objective_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="lam"):
        make_objective("cmim", {"lam": -1})
    with pytest.raises(ValueError, match="extra"):
        make_objective("ls", {"epsilon": 0.1})
    with pytest.raises(ValueError, match="sampled"):
        make_objective("cmim", {"sampled": 2, "centroids": "ema"})
    with pytest.raises(ValueError, match="valid choices: ce, ls, cmim, nasty"):
        cfg(objective="focal")


def test_checkpoint_round_trip_and_fine_tuning(data, tmp_path: Path) -> None:
    r = train_model(cfg(objective="ce"), data)
    w, c = save_checkpoint(r.model, r.meta, tmp_path / "ck")
    model, meta = load_checkpoint(w)
    assert meta == r.meta
    x = data.x_test[:50]
    assert torch.equal(model(x), r.model(x))
    tuned = train_model(cfg(objective="cmim", epochs=1), data, init_weights=w)
    assert tuned.best_acc > 0
    assert set(load_file(str(w))) == set(r.model.state_dict())


def test_cli_train_every_objective_leaves_loadable_checkpoint(data, tmp_path: Path) -> None:
    runner = CliRunner()
    for objective in ["ce", "ls", "cmim", "nasty"]:
        out = tmp_path / objective
        args = [
            "train",
            "--out",
            str(out),
            "--arch",
            "mlp",
            "--objective",
            objective,
            "--epochs",
            "2",
            "--device",
            "cpu",
        ]
        args += ["--dataset-param", "num_train=300", "--dataset-param", "num_test=200"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        model, meta = load_checkpoint(out / "model.safetensors")
        assert meta.objective == objective
        assert model(data.x_test[:8]).shape == (8, 10)
    result = runner.invoke(
        app, ["cmi", str(tmp_path / "cmim" / "model.safetensors"), "--json", "-t", "1", "-t", "4"]
    )
    assert result.exit_code == 0 and '"4"' in result.output


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--arch", "resnet9000", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown model 'resnet9000'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["cmi", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "no weights file" in result.output


def test_cli_audit_writes_the_report_with_the_default_budget_curve(tmp_path: Path) -> None:
    import json

    runner = CliRunner()
    small = ["--dataset-param", "num_train=300", "--dataset-param", "num_test=200"]
    train = ["train", "--out", str(tmp_path / "t"), "--arch", "mlp", "--epochs", "2", "--device", "cpu"]
    assert runner.invoke(app, train + small).exit_code == 0
    audit = ["audit", "--teacher", str(tmp_path / "t" / "model.safetensors"), "--attack", "hard_label"]
    audit += ["--seeds", "2", "--epochs", "1", "--ls-eps", "0.1", "--no-ls-mixup", "--device", "cpu"]
    for extra, budgets in ((["--workers", "2"], [300, 1500, 7500]), (["--no-budgets"], [])):
        out = tmp_path / f"report{len(budgets)}.json"
        result = runner.invoke(app, audit + extra + ["--out", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        assert report["config"]["query_budgets"] == budgets
        assert ("safe query budget (teacher)" in result.output) == bool(budgets)
        assert report["statement"]["served_as"] == "labels only"
