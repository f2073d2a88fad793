"""The predict endpoint over real API processes: two uvicorn replicas sharing Redis and PostgreSQL
(deployed), and one on SQLite (embedded). Budgets stay exact under concurrency, per (key, model) and per
owner; the rate limit and revocations hold across replicas; a standard v2 client (tritonclient) works."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from service_helpers import assert_problem, copy_job, job_body, service_settings
from sqlalchemy import select
from test_e2e import Stack, base_env

from app.core.db import session_scope
from app.core.keys import create_api_key, find_api_key
from app.core.limits import counters_for, read_usage
from app.core.migrate import upgrade
from app.core.models import Artifact
from app.services.jobs import create_job
from app.services.schemas import JobCreate
from ml.checkpoint import load_checkpoint
from ml.oracle import OutputMode, apply_output_mode
from worker.pipeline import run_job

OWNER_BUDGET = 90
CLIENTS = 16
ROWS = 3


class Replicas:
    """API processes over one database, a trained model A and its copy B (another model id), and keys."""

    def __init__(self, url: str, tmp: Path, env: dict[str, str], count: int) -> None:
        self.url, self.tmp, self.env = url, tmp, env
        settings = service_settings(url, tmp)
        with session_scope(url) as s:
            _, secret = create_api_key(s)
        with session_scope(url) as s:
            job, _ = create_job(
                s, settings, find_api_key(s, secret), JobCreate.model_validate(job_body()), None
            )
        assert run_job(job.id, settings) == "succeeded"
        self.job_id = job.id
        self.stacks = [Stack(env, tmp) for _ in range(count)]
        for i in range(count):
            self.start(i)
        with session_scope(url) as s:
            weights, config = (
                s.scalar(select(Artifact.storage_key).where(Artifact.job_id == job.id, Artifact.name == n))
                for n in ("model.safetensors", "model.json")
            )
        root = Path(settings.artifact_url.removeprefix("file://"))
        self.local = load_checkpoint(root / weights, root / config)[0]

    def start(self, i: int) -> None:
        stack = self.stacks[i]
        proc = stack.start(f"api-{i}-{time.monotonic_ns()}", *UVICORN, "--port", str(stack.port))
        stack.wait_healthy(proc)

    def base(self, i: int) -> str:
        return self.stacks[i % len(self.stacks)].base

    def tenant(self) -> Tenant:
        """A new owner with two models of its own (each test its own owner: owner budgets stay apart)."""
        owner = uuid.uuid4()
        return Tenant(self, owner, *(str(copy_job(self.url, self.job_id, owner)) for _ in range(2)))

    def close(self) -> None:
        for stack in self.stacks:
            stack.close()


class Tenant:
    """An owner, its models A and B, and the means to make its keys."""

    def __init__(self, replicas: Replicas, owner_id: uuid.UUID, model_a: str, model_b: str) -> None:
        self.replicas, self.owner_id, self.model_a, self.model_b = replicas, owner_id, model_a, model_b

    def key(self, **kwargs: Any) -> tuple[dict[str, str], Any]:
        with session_scope(self.replicas.url) as s:
            row, secret = create_api_key(s, owner_id=self.owner_id, **kwargs)
            return {"Authorization": f"Bearer {secret}"}, row


UVICORN = ["-m", "uvicorn", "app.main:create_app", "--factory", "--no-access-log"]


def _patch_env(env: dict[str, str], **values: str) -> dict[str, str]:
    return env | {f"CMIM_{k.upper()}": v for k, v in values.items()}


@pytest.fixture(scope="module")
def deployed(pg_databases, redis_url, tmp_path_factory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("replicas")
    url = pg_databases.create()
    upgrade(url)
    prefix = f"cmim-test-{uuid.uuid4().hex[:8]}"  # the shared Redis: our counters only
    env = _patch_env(
        base_env(tmp),
        database_url=url,
        broker_url=redis_url,
        redis_prefix=prefix,
        owner_query_budget=str(OWNER_BUDGET),
        rate_limit_per_minute="100000",
        predict_max_batch="64",
    )
    replicas = Replicas(url, tmp, env, count=2)
    try:
        yield replicas
    finally:
        replicas.close()
        client = redis.Redis.from_url(redis_url)
        for name in client.scan_iter(f"{prefix}:*"):  # ours only; the shared Redis is never flushed
            client.delete(name)


X = torch.randn(64, 1, 40, generator=torch.Generator().manual_seed(3))


def v2_body(x: torch.Tensor) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}
        ]
    }


def hammer(
    replicas: Replicas, model: str, headers_of: Callable[[int], dict[str, str]], stop_on: str
) -> tuple[int, list[dict[str, Any]]]:
    """CLIENTS threads send ROWS-row requests alternately to every replica until a 429 of `stop_on`;
    returns the rows answered and the 429 bodies."""
    refusals: list[dict[str, Any]] = []

    def client(i: int) -> int:
        answered = 0
        with httpx.Client(timeout=30) as c:
            for n in range(1000):
                r = c.post(
                    f"{replicas.base(i + n)}/v2/models/{model}/infer",
                    json=v2_body(X[(i + n) % 20 : (i + n) % 20 + ROWS]),
                    headers=headers_of(i),
                )
                if r.status_code == 429:
                    body = assert_problem(r, 429)
                    refusals.append(body)
                    if body["budget"]["scope"] == stop_on:
                        return answered
                    continue
                assert r.status_code == 200, r.text
                answered += r.json()["outputs"][0]["shape"][0]
        pytest.fail("the budget never ran out")

    with ThreadPoolExecutor(CLIENTS) as pool:
        return sum(pool.map(client, range(CLIENTS))), refusals


def stored(url: str, counters: list[Any], expected: list[int], timeout: float = 10) -> None:
    """The write-back reaches the database: the stored counts become `expected`."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(url) as s:
            got = [read_usage(s, counters)[c] for c in counters]
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == expected


def test_a_key_budget_is_exact_under_16_clients_over_2_replicas(deployed: Replicas) -> None:
    t = deployed.tenant()
    budget = 40
    headers, key = t.key(query_budget=budget)
    answered, refusals = hammer(deployed, t.model_a, lambda _: headers, stop_on="key")
    assert answered == budget - budget % ROWS  # every request fitted until fewer than ROWS rows were left
    assert {b["budget"]["scope"] for b in refusals} == {"key"}
    assert refusals[0]["budget"]["limit"] == budget and "does not reset" in refusals[0]["detail"]
    # The last row still fits; then nothing does.
    one = httpx.post(f"{deployed.base(1)}/v2/models/{t.model_a}/infer", json=v2_body(X[:1]), headers=headers)
    assert one.status_code == 200 and one.headers["x-query-budget-remaining"] == "0"
    assert_problem(
        httpx.post(f"{deployed.base(0)}/v2/models/{t.model_a}/infer", json=v2_body(X[:1]), headers=headers),
        429,
    )
    counters = list(counters_for(key.id, key.owner_id, uuid.UUID(t.model_a)))[:2]
    stored(deployed.url, counters, [budget, budget])  # charged == answered, durably


def test_an_owner_budget_holds_over_all_its_keys(deployed: Replicas) -> None:
    t = deployed.tenant()
    _, first = t.key()
    keys = [first] + [t.key()[1] for _ in range(3)]
    heads = [t.key()[0] for _ in range(4)]
    answered, refusals = hammer(deployed, t.model_a, lambda i: heads[i % 4], stop_on="owner")
    assert OWNER_BUDGET - ROWS < answered <= OWNER_BUDGET
    assert {b["budget"]["scope"] for b in refusals} == {"owner"}
    owner = counters_for(keys[0].id, first.owner_id, uuid.UUID(t.model_a))[1]
    stored(deployed.url, [owner], [answered])
    # Minting another key under that owner buys nothing more.
    fresh, _ = t.key()
    r = httpx.post(f"{deployed.base(0)}/v2/models/{t.model_a}/infer", json=v2_body(X[:ROWS]), headers=fresh)
    assert assert_problem(r, 429)["budget"]["scope"] == "owner"


def test_a_keys_rows_on_one_model_leave_its_budget_on_another_alone(deployed: Replicas) -> None:
    t = deployed.tenant()
    headers, _ = t.key(query_budget=10)
    a, b = (f"{deployed.base(0)}/v2/models/{m}/infer" for m in (t.model_a, t.model_b))
    assert httpx.post(a, json=v2_body(X[:10]), headers=headers).status_code == 200
    assert (
        assert_problem(httpx.post(a, json=v2_body(X[:1]), headers=headers), 429)["budget"]["scope"] == "key"
    )
    on_b = httpx.post(b, json=v2_body(X[:4]), headers=headers)
    assert on_b.status_code == 200 and on_b.headers["x-query-budget-remaining"] == "6"
    meta = httpx.get(f"{deployed.base(1)}/v2/models/{t.model_b}", headers=headers).json()
    assert meta["parameters"]["query_budget"]["used"] == 4


def test_the_rate_limit_holds_across_replicas(deployed: Replicas) -> None:
    t = deployed.tenant()
    headers, _ = t.key(rate_limit_per_minute=20)

    def send(i: int) -> int:
        r = httpx.post(
            f"{deployed.base(i)}/api/v1/models/{t.model_a}/predict",
            json={"inputs": X[:1].tolist()},
            headers=headers,
            timeout=30,
        )
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, range(60)))
    assert codes.count(200) == 20 and codes.count(429) == 40


def test_a_revoked_key_is_refused_by_another_replica_within_a_second(deployed: Replicas) -> None:
    t = deployed.tenant()
    admin, _ = t.key()
    made = httpx.post(f"{deployed.base(0)}/api/v1/keys", json={"name": "client"}, headers=admin)
    assert made.status_code == 201 and made.json()["scopes"] == ["models:predict"]
    client = {"Authorization": f"Bearer {made.json()['key']}"}
    url = f"{deployed.base(1)}/v2/models/{t.model_a}/ready"
    assert httpx.get(url, headers=client).status_code == 200  # cached by replica 1 now
    assert (
        httpx.delete(f"{deployed.base(0)}/api/v1/keys/{made.json()['id']}", headers=admin).status_code == 204
    )
    # Replica 1 drops the revoked key at its next poll (every `key_poll_seconds`, 0.25 s): within a
    # second on an idle machine. The deadline is generous so that a loaded machine cannot fail the test.
    revoked = time.monotonic()
    while (code := httpx.get(url, headers=client).status_code) == 200 and time.monotonic() - revoked < 30:
        time.sleep(0.02)
    print(f"\nrevoked key refused by the other replica {time.monotonic() - revoked:.2f} s after the revoke")
    assert code == 401


def test_a_standard_v2_client_speaks_to_the_server(deployed: Replicas) -> None:
    t = deployed.tenant()
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    headers, _ = t.key()
    model = t.model_a
    client = tc.InferenceServerClient(deployed.base(0).removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready(model, headers=headers)
    meta = client.get_model_metadata(model, headers=headers)
    assert meta["inputs"][0]["shape"] == [-1, 1, 40]

    x = X[:5].numpy()
    with torch.no_grad():
        expected = apply_output_mode(
            torch.softmax(deployed.local(X[:5]), -1), OutputMode.model_validate({"kind": "probs"})
        )
    for binary in (False, True):
        tensor = tc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [tc.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
        result = client.infer(model, [tensor], outputs=outputs, headers=headers)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected.numpy(), rtol=1e-5, atol=1e-6)
        assert result.as_numpy("label").tolist() == expected.argmax(-1).tolist()
    # Default outputs (all, as JSON) with FP64 inputs, cast to FP32.
    tensor = tc.InferInput("input", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x.astype(np.float64), binary_data=True)
    result = client.infer(model, [tensor], headers=headers)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected.numpy(), rtol=1e-5, atol=1e-6)

    bad = tc.InferInput("input", [2, 1, 40], "INT8")
    bad.set_data_from_numpy(np.zeros((2, 1, 40), np.int8))
    with pytest.raises(InferenceServerException, match="datatype 'INT8' is not accepted"):
        client.infer(model, [bad], headers=headers)
    with pytest.raises(InferenceServerException, match="unknown or revoked API key"):
        client.get_model_metadata(model, headers={"Authorization": "Bearer nope"})
    client.close()


@pytest.mark.parametrize(
    "body, msg",
    [
        (
            {"inputs": [{"name": "input", "shape": [1, 1, 40], "datatype": "INT8", "data": [1000.5] * 40}]},
            "INT8",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 1, 40], "datatype": "FP32", "data": [True] * 40}]},
            "number",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 1, 40], "datatype": "FP64", "data": [1e300] * 40}]},
            "FP32",
        ),
    ],
    ids=["int8", "booleans", "fp64-beyond-fp32"],
)
def test_datatypes_are_honoured(deployed: Replicas, body: dict[str, Any], msg: str) -> None:
    t = deployed.tenant()
    headers, _ = t.key()
    # No Content-Type, as standard v2 clients send it.
    r = httpx.post(
        f"{deployed.base(0)}/v2/models/{t.model_a}/infer",
        content=httpx.Request("POST", "/", json=body).content,
        headers=headers,
    )
    problem = assert_problem(r, 422)
    assert msg in problem["detail"] and problem["error"] == problem["detail"]


# ---------------------------------------------------------------- embedded: one process on SQLite


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("embedded-predict")
    url = f"sqlite:///{tmp / 'cmim.db'}"
    upgrade(url)
    env = _patch_env(base_env(tmp), database_url=url, rate_limit_per_minute="100000", predict_max_batch="64")
    replicas = Replicas(url, tmp, env, count=1)
    try:
        yield replicas
    finally:
        replicas.close()


def test_embedded_budget_is_exact_under_16_clients_and_survives_a_restart(embedded: Replicas) -> None:
    t = embedded.tenant()
    budget = 40
    headers, key = t.key(query_budget=budget)
    answered, _ = hammer(embedded, t.model_a, lambda _: headers, stop_on="key")
    assert answered == budget - budget % ROWS
    counters = list(counters_for(key.id, key.owner_id, uuid.UUID(t.model_a)))[:1]
    stored(embedded.url, counters, [answered])  # batched write-back
    # A restarted process seeds its counters from the database: the budget is not reset.
    embedded.stacks[0].close()
    embedded.start(0)
    r = httpx.post(f"{embedded.base(0)}/v2/models/{t.model_a}/infer", json=v2_body(X[:ROWS]), headers=headers)
    assert assert_problem(r, 429)["budget"]["used"] == answered
