"""The README's predict and keys examples, run as written against `cmim serve` (embedded) with a trained
model; and the hint `cmim serve` gives when keys exist already keeps the operator's jobs visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import job_body, service_settings
from test_e2e import Proc, Stack, base_env

from app.core.db import session_scope
from app.core.keys import create_api_key
from app.core.migrate import upgrade
from app.core.models import ApiKey
from app.services.jobs import create_job
from app.services.schemas import JobCreate
from worker.pipeline import run_job

README = Path(__file__).resolve().parents[2] / "README.md"
# Three LS students per family: the fewest independent models the evidence test compares a suspect with.
EVIDENCE_READY = job_body(**{"audit.ls_eps": [0.0, 0.1, 0.2]})


def readme_commands(heading: str) -> list[str]:
    """The commands of the indented code block under `heading` (continuation lines joined)."""
    lines = README.read_text().split(f"\n{heading}\n", 1)[1].split("\n")
    block: list[str] = []
    started = False
    for line in lines:
        if line.startswith("    "):
            started = True
            if block and block[-1].endswith("\\"):
                block[-1] = block[-1][:-1] + " " + line.strip()
            else:
                block.append(line.strip())
        elif started and line.strip():
            break
    assert block, f"no commands under {heading}"
    return block


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Stack, str, Proc]]:
    """`cmim serve` on SQLite over a database that already has a key (the operator's) and a trained model."""
    tmp = tmp_path_factory.mktemp("readme")
    url = f"sqlite:///{tmp / 'cmim.db'}"
    upgrade(url)
    settings = service_settings(url, tmp)
    with session_scope(url) as s:
        operator, _ = create_api_key(s, name="operator")
        owner = operator.owner_id
    with session_scope(url) as s:
        job, _ = create_job(
            s, settings, s.get(ApiKey, operator.id), JobCreate.model_validate(EVIDENCE_READY), None
        )
    assert run_job(job.id, settings) == "succeeded"
    stack = Stack(base_env(tmp, CMIM_DATABASE_URL=url), tmp)
    serve = stack.start("serve", "-m", "worker.cli", "serve", "--port", str(stack.port), "--no-worker")
    try:
        stack.wait_healthy(serve)
        deadline = time.monotonic() + 10
        while "keys create --owner" not in serve.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"cmim keys create --owner {owner}" in serve.output(), serve.output()
        yield stack, str(job.id), serve
    finally:
        stack.close()


@pytest.fixture(scope="module")
def stack(served) -> Stack:
    """The stack, its key made by the command `cmim serve` suggested."""
    stack, _, serve = served
    command = serve.output().split("`cmim keys create", 1)[1].split("`", 1)[0]
    made = subprocess.run(
        [sys.executable, "-m", "worker.cli", "keys", "create", *command.split()],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    stack.key = made.stdout.strip().splitlines()[-1]
    return stack


def test_the_serve_hint_makes_a_key_that_sees_the_operators_jobs(served, stack: Stack) -> None:
    assert stack.get(f"/api/v1/jobs/{served[1]}").json()["status"] == "succeeded"


def run(command: str, stack: Stack, env: dict[str, str]) -> str:
    """One README command, with the server's port for 8000; its stdout (it must exit 0)."""
    done = subprocess.run(
        ["bash", "-c", command.replace("localhost:8000", f"127.0.0.1:{stack.port}")],
        env=os.environ | env,
        cwd=stack.tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{command}\n{done.stderr}"
    return done.stdout


def test_the_readme_predict_and_keys_examples_work_as_written(served, stack: Stack) -> None:
    job_id = served[1]
    spare = httpx.post(
        f"{stack.base}/api/v1/keys", json={"name": "spare"}, headers=stack.headers, timeout=30
    ).json()
    env = {"KEY": stack.key, "ID": job_id, "KEY_ID": spare["id"]}
    answers = []
    for command in readme_commands("### Querying a model") + readme_commands("### Keys"):
        out = run(command, stack, env)
        if command.startswith("curl") and out:
            body = json.loads(out)
            assert "error" not in body and "status" not in body, f"{command}\n{out}"
            answers.append(body)
    infer = next(a for a in answers if "model_name" in a)
    predict = next(a for a in answers if "predictions" in a)
    labels = next(o for o in infer["outputs"] if o["name"] == "label")["data"]
    assert labels == [p["label"] for p in predict["predictions"]]  # one input, both routes, one answer
    made = next(a for a in answers if "key" in a)
    assert made["scopes"] == ["models:predict"] and made["query_budget"] == 5000
    assert (
        httpx.get(
            f"{stack.base}/api/v1/keys/me", headers={"Authorization": f"Bearer {spare['key']}"}
        ).status_code
        == 401
    )


def test_the_readme_evidence_example_works_as_written(served, stack: Stack) -> None:
    """The README's challenge and verify commands, as written; the suspect is the model's own teacher."""
    job_id = served[1]
    artifacts = stack.get(f"/api/v1/jobs/{job_id}/artifacts").json()
    kinds = {a["kind"]: a["name"] for a in artifacts}
    files = {
        field: (kinds[kind], stack.get(f"/api/v1/jobs/{job_id}/artifacts/{kinds[kind]}").content)
        for field, kind in (("file", "weights"), ("config", "config"))
    }
    up = httpx.post(f"{stack.base}/api/v1/models", files=files, headers=stack.headers, timeout=60)
    assert up.status_code == 201, up.text
    env = {"KEY": stack.key, "JOB": job_id, "SUSPECT": up.json()["id"]}
    commands = readme_commands("### When a copy is made anyway: evidence and monitoring")
    assert len(commands) == 3, commands
    # the suspect's upload is step 3 of the owner's walk-through (tests/service/test_e2e_owner.py); here the
    # suspect is the teacher's own checkpoint, uploaded above
    assert commands[0].startswith("SUSPECT=$(curl -s -X POST localhost:8000/api/v1/models "), commands[0]
    run(commands[1], stack, env)
    challenge = json.loads((stack.tmp / "challenge.json").read_text())
    assert len(challenge["inputs"]) == challenge["points"] > 0 and "labels" not in challenge
    verdict = json.loads(run(commands[2], stack, env))
    # The teacher itself agrees on every point. Whether that is told apart from independent students
    # needs a trained teacher (tests/service/test_evidence_api.py); this tiny one is not: its LS
    # students agree on 99.6 % of the challenge.
    assert verdict["agreement"] == 1.0 and verdict["verdict"] in {"copy", "not_shown"}, json.dumps(verdict)
    assert verdict["commitment"]["sha256"] == challenge["commitment"]["sha256"]
    assert 0 < verdict["p_value"] <= 1
