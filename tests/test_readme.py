"""Every command-line command the README shows runs, in the README's order, with its own flags, on tiny
settings: --epochs, --teacher-epochs and --seeds become 1, and an audit attacks with hard_label and fm
only, against one LS student, under one query budget of 500; `bench speed` runs 2 steps, 1 round, 2
students; `bench paper --quick` 1 seed of 1 epoch; the two full benchmarks (about an hour each) only
parse their options (--help). The API walk-through and `bench/predict_load.py` run against real servers in
tests/service/test_e2e.py."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
SHRINK = {"--epochs": "1", "--teacher-epochs": "1", "--seeds": "1"}


def readme_commands(prefix: str) -> list[str]:
    """The README's indented command lines that start with `prefix` (after an optional VAR=value)."""
    lines = [line.strip() for line in README.read_text().splitlines() if line.startswith("    ")]
    return [line for line in lines if re.sub(r"^(\w+=\S+ )+", "", line).startswith(prefix)]


def tiny(command: str) -> list[str]:
    """The command as argv for this interpreter, shrunk as the module docstring says."""
    argv = shlex.split(command.split("  #")[0])
    while "=" in argv[0]:  # an environment assignment such as OMP_NUM_THREADS=2
        argv.pop(0)
    assert argv[0] == ".venv/bin/cmim", command
    argv = [sys.executable, "-m", "worker.cli", *argv[1:]]
    argv = [SHRINK[argv[i - 1]] if argv[i - 1] in SHRINK else a for i, a in enumerate(argv)]
    if argv[3] == "audit":
        argv += [
            "--attack",
            "hard_label",
            "--attack",
            "fm",
            "--ls-eps",
            "0",
            "--no-ls-mixup",
            "--budget",
            "500",
        ]
    if "--preset" in argv:  # the preset's schedule, shrunk by explicit options (which override it)
        argv += ["--teacher-epochs", "1", "--seeds", "1", "--epochs", "1"]
    if argv[3:5] == ["bench", "speed"]:
        argv += ["--steps", "2", "--rounds", "1", "--students", "2"]
    if argv[3:5] == ["bench", "paper"]:
        argv += ["--seeds", "1", "--epochs", "1"] if "--quick" in argv else ["--help"]
    return argv


def test_every_cli_command_in_the_readme_runs(owner_example: Path, tmp_path: Path) -> None:
    commands = readme_commands(".venv/bin/cmim")
    assert len(commands) >= 12 and any("--teacher model.onnx" in c for c in commands)
    for name in ("tabular.npz", "model.onnx", "checkpoint"):
        src = owner_example / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    # One process runs them all through the console script's entry point (importing torch once, not
    # fifteen times), one after the other, printing a marker after each.
    argvs = [tiny(c)[3:] for c in commands]
    script = (
        "import sys\n"
        "from worker.cli import cli\n"
        f"for args in {argvs!r}:\n"
        "    print('RUN', ' '.join(args), flush=True)\n"
        "    cli(args, standalone_mode=False)\n"
        "print('ALL DONE')\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    last = [line for line in done.stdout.splitlines() if line.startswith("RUN ")][-1:]
    assert done.returncode == 0 and "ALL DONE" in done.stdout, f"{last}\n{done.stderr[-3000:]}"
    assert done.stdout.count("RUN ") == len(commands)
    assert "from file" in done.stdout  # `cmim datasets` lists the npz loader
    assert (tmp_path / "runs" / "tuned" / "model.json").is_file()
