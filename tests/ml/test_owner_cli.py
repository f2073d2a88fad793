"""The command line with an owner's own model: ONNX audits, --init guards, tables that fit 100 columns,
and the ML commands without the service's packages installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ml.cli import app

runner = CliRunner()
TINY = ["--seeds", "1", "--epochs", "1", "--attack", "hard_label", "--attack", "fm", "--ls-eps", "0"]


def test_audit_of_an_onnx_teacher_without_control_arch_has_no_control(
    owner_example: Path, tmp_path: Path
) -> None:
    out = tmp_path / "audit.json"
    args = ["audit", "--teacher", str(owner_example / "model.onnx"), "--dataset", "npz", "--dataset-param"]
    args += [f"path={owner_example / 'tabular.npz'}", *TINY, "--no-budgets", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["control"] is None and report["verdict"] != "undistillable"
    assert report["teacher"]["accuracy"] > 70  # the owner's model, as it is
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 100 and any("margin vs LS" in line for line in lines)


def test_audit_of_an_onnx_teacher_refuses_the_wrong_data(owner_example: Path) -> None:
    args = ["audit", "--teacher", str(owner_example / "model.onnx"), "--dataset", "digits", *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "the model's input is (batch, 20) but the data's examples are (1, 8, 8)" in result.output


def test_train_init_refuses_mismatched_keys_in_one_line(owner_example: Path, tmp_path: Path) -> None:
    from owner_models import edited_checkpoint

    bad = edited_checkpoint(owner_example / "checkpoint", tmp_path / "bad", {"1.5.bias": "1.head.bias"})
    args = ["train", "--init", str(bad / "model.safetensors"), "--arch", "mlp", "--dataset", "npz"]
    args += [
        "--dataset-param",
        f"path={owner_example / 'tabular.npz'}",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if "error:" in line]
    assert error == [
        "error: weights do not match the architecture: missing keys [1.5.bias], unexpected keys [1.head.bias]"
    ]


def test_ml_commands_work_without_the_service_packages(tmp_path: Path) -> None:
    """`pip install .` without the service extra: the console script must not need SQLAlchemy & co."""
    blocked = [
        "sqlalchemy",
        "fastapi",
        "celery",
        "uvicorn",
        "redis",
        "alembic",
        "psycopg",
        "pydantic_settings",
    ]
    commands = [
        ["attacks"],
        ["datasets"],
        ["train", "--dataset", "digits", "--arch", "mlp", "--objective", "ce", "--epochs", "1", "--out", "t"],
        ["cmi", "t/model.safetensors"],
        ["audit", "--teacher", "t/model.safetensors", *TINY, "--no-budgets", "--no-control"],
        ["bench", "speed", "--steps", "2", "--rounds", "1", "--students", "2"],
    ]
    # One process runs them all (the console script's entry point, in-process, one after the other).
    script = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # importing any of them now fails\n"
        "from worker.cli import cli\n"
        f"for args in {commands!r}:\n"
        "    cli(args, standalone_mode=False)\n"
        "    print('done', args[0])\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done ") == len(commands)


def test_a_fine_tuned_checkpoints_control_trains_from_scratch_for_teacher_epochs(
    owner_example: Path, tmp_path: Path, monkeypatch
) -> None:
    """A checkpoint fine-tuned with `train --init` records a fine-tuning recipe (a tenth of the rate, a
    warm-up): the audit's CE control trains from scratch for --teacher-epochs instead, as the service's."""
    import ml.cli as cli_module
    from ml.train import TrainConfig

    data = ["--dataset", "npz", "--dataset-param", f"path={owner_example / 'tabular.npz'}"]
    tuned = tmp_path / "tuned"
    args = ["train", "--init", str(owner_example / "checkpoint" / "model.safetensors"), "--arch", "mlp"]
    result = runner.invoke(app, [*args, "--objective", "cmim", "--epochs", "1", *data, "--out", str(tuned)])
    assert result.exit_code == 0, result.output
    assert json.loads((tuned / "model.json").read_text())["train_config"]["lr"] < TrainConfig().lr
    stages = []
    real = cli_module._train_stage
    monkeypatch.setattr(cli_module, "_train_stage", lambda cfg, *a: stages.append(cfg) or real(cfg, *a))
    args = ["audit", "--teacher", str(tuned / "model.safetensors"), *data, "--teacher-epochs", "2", *TINY]
    result = runner.invoke(app, [*args, "--no-budgets", "--out", str(tmp_path / "audit.json")])
    assert result.exit_code == 0, result.output
    (control,) = stages
    assert (control.objective, control.epochs, control.lr, control.warmup_epochs) == (
        "ce",
        2,
        TrainConfig().lr,
        0.0,
    )
