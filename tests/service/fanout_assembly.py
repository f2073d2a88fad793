"""A fan-out job in one process: run_job hands its audit over, every task runs as a worker would run it,
and the chord callback is called as a fresh worker would call it (no plan cached in the process).

`callback_cost(settings, handoff)` runs the callback counting what it loads and computes: model loads,
module forward passes and its seconds. Run as a script it prints them for SEEDED_JOB (the assembly time
before and after the typed hand-off are measured with it):
`python tests/service/fanout_assembly.py [--larger]`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

LOADERS = (  # every way a model comes into memory: counted in the callback
    ("ml.checkpoint", "load_checkpoint"),
    ("ml.onnx_model", "load_onnx"),
)


def hand_off(settings: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Submit `body`, run it until its audit is handed over, and return the hand-off (JSON, as sent)."""
    from app.core.db import session_scope
    from app.core.keys import create_api_key
    from app.services.jobs import create_job
    from app.services.schemas import JobCreate
    from worker.pipeline import run_job

    with session_scope(settings.database_url) as s:
        key, _ = create_api_key(s)
        job, _ = create_job(s, settings, key, JobCreate.model_validate(body), None)
        job_id = job.id
    sent: list[Any] = []
    assert run_job(job_id, settings, fan_out=sent.append) == "audit handed to the workers"
    (handoff,) = sent
    return json.loads(json.dumps(handoff if isinstance(handoff, dict) else handoff.model_dump(mode="json")))


def run_tasks(settings: Any, handoff: dict[str, Any]) -> list[dict[str, Any]]:
    from worker.fanout import run_audit_task

    return [run_audit_task(handoff, i, settings) for i in range(handoff["tasks"])]


def forget_plans() -> None:
    """What a fresh worker process has cached of a job: nothing."""
    for name in ("worker.pipeline", "worker.plans"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "_plans"):
            module._plans.clear()


def callback_cost(settings: Any, handoff: dict[str, Any], outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """The chord callback run once: what it returned, its seconds, model loads and forward passes."""
    import importlib

    from worker.fanout import assemble_and_publish

    counts = {"loads": 0, "forwards": 0}
    patched = []
    for module_name, attr in LOADERS:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)

        def counting(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            counts["loads"] += 1
            return _original(*args, **kwargs)

        patched.append((module, attr, original))
        setattr(module, attr, counting)
        for other in list(sys.modules.values()):  # names imported with `from module import attr`
            if getattr(other, attr, None) is original and other is not module:
                patched.append((other, attr, original))
                setattr(other, attr, counting)

    def forward(*_: Any) -> None:
        counts["forwards"] += 1

    hook = torch.nn.modules.module.register_module_forward_pre_hook(forward)
    forget_plans()
    try:
        t0 = time.perf_counter()
        outcome = assemble_and_publish(outcomes, handoff, settings)
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
        for module, attr, original in patched:
            setattr(module, attr, original)
    return {"outcome": outcome, "seconds": seconds, **counts}


if __name__ == "__main__":
    import tempfile

    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # as pytest sets it
    from service_helpers import service_settings
    from test_seeded_report import SEEDED_JOB

    from app.core.migrate import upgrade

    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp / 'cmim.db'}"
    upgrade(url)
    settings = service_settings(url, tmp)
    body = json.loads(json.dumps(SEEDED_JOB))
    if "--larger" in sys.argv:  # bench/fanout.py's data and teacher, one epoch each: the plan costs more
        data = {"num_train": 2000, "num_test": 2000}
        body["teacher"] |= {"dataset_params": data, "arch": "cnn1d", "epochs": 1}
        body["audit"] |= {"epochs": 1}
    handoff = hand_off(settings, body)
    outcomes = run_tasks(settings, handoff)
    print(json.dumps(callback_cost(settings, handoff, outcomes)))
