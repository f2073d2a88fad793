"""A real S3-compatible server for the tests: moto in server mode, as a child process on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

# moto accepts any credentials; s3fs and boto read these standard variables.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "cmim-test",
    "AWS_SECRET_ACCESS_KEY": "cmim-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server(log: Path) -> Iterator[str]:
    """Start `moto.server` on a free port; yields its endpoint URL and stops it at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=os.environ | CREDENTIALS,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                httpx.get(endpoint, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"moto server never answered:\n{log.read_text()}"
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
