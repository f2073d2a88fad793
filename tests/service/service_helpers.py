"""Helpers shared by the service tests."""

from __future__ import annotations

import copy
from typing import Any

PROBLEM_JSON = "application/problem+json"

# A job small enough to finish in seconds on a CPU.
TINY_JOB: dict[str, Any] = {
    "teacher": {
        "dataset": "mnist1d",
        "dataset_params": {"num_train": 500, "num_test": 500},
        "arch": "cnn1d",
        "objective": "cmim",
        "epochs": 3,
    },
    "audit": {
        "students": ["mlp"],
        "attacks": ["kd", "hard_label"],
        "seeds": 1,
        "epochs": 2,
        "ls_eps": [0.0],
        "ls_mixup": False,
        "control": True,
    },
}


def job_body(**changes: Any) -> dict[str, Any]:
    """TINY_JOB with dotted-path changes, e.g. job_body(**{"teacher.arch": "nope"})."""
    body = copy.deepcopy(TINY_JOB)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = body
        for p in parents:
            node = node[p]
        node[last] = value
    return body


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body
