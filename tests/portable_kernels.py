"""Figures compared with stored ones come from torch's portable CPU kernels: the vectorised ones (AVX2,
AVX-512) round differently and a few epochs of training amplify that. On a vectorised CPU a test runs
itself again in a process pinned to the portable kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def ran_on_portable_kernels(request: pytest.FixtureRequest) -> bool:
    """True when this test was run again in a process pinned to the portable kernels (and passed there):
    the caller returns. False when this process already runs them: the caller goes on."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False
    env = os.environ | {"ATEN_CPU_CAPABILITY": "default"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=request.config.rootpath)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return True
