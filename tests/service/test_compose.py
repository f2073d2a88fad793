"""The deployment files: docker-compose.yml must be valid Compose (checked by the real docker-compose)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compose(*args: str, session_secret: str | None = "s" * 32) -> subprocess.CompletedProcess[str]:
    """docker-compose on the file, with the session secret an operator must give it (None: not given)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "CMIM_SESSION_SECRET"}
    if session_secret is not None:
        env["CMIM_SESSION_SECRET"] = session_secret
    env.setdefault("CMIM_SECRET_KEY", "x" * 43 + "=")  # the stored secrets' key, also required
    command = [binary, "-f", "docker-compose.yml", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid() -> None:
    r = compose("config", "-q")
    assert r.returncode == 0, r.stderr
    # Without a session secret it refuses at once, saying which (the services would refuse it too).
    r = compose("config", "-q", session_secret=None)
    assert r.returncode != 0 and "set CMIM_SESSION_SECRET" in r.stderr


def test_compose_runs_the_deployed_split() -> None:
    r = compose("config", "--services")
    assert r.returncode == 0, r.stderr
    services = {"api", "migrate", "worker", "notifier", "redis", "postgres", "s3", "s3-bucket"}
    assert set(r.stdout.split()) == services
    full = compose("config").stdout
    assert "driver: nvidia" in full and "capabilities:" in full  # the worker reserves a GPU
    assert "CMIM_BROKER_URL: redis://redis:6379/0" in full
    assert "service_completed_successfully" in full  # api and worker wait for the migrations
    # Artifacts on the S3-compatible store that every worker machine reaches.
    assert "CMIM_ARTIFACT_URL: s3://cmim/artifacts" in full and "CMIM_S3_ENDPOINT_URL: http://s3:9000" in full
