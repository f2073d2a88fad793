"""The evidence bundle: its numpy-only script, run in a fresh process of an environment holding numpy and
nothing else, reproduces the verdict of a copy and of an independent model and of a remote endpoint (with
its request log); one changed answer or a wrong secret fails the check; downloading a bundle retires its
challenge and the model gets a fresh one, committed the same way, on which the knockoff is still caught."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from remote_helpers import SERVERS, evidence_owner, export_onnx, finished, json_server, start, thief_models
from service_helpers import Trained, assert_problem
from test_evidence_api import DATA

from ml.data import load_dataset


@pytest.fixture(scope="module")
def owner(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return evidence_owner(sqlite_url, tmp_path_factory)


def numpy_python() -> Path:
    python = SERVERS / "numpy" / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"{python} is missing: `make servers` (part of `make install`) makes the numpy-only environment"
        )
    return python


def check(bundle: bytes, folder: Path) -> subprocess.CompletedProcess[str]:
    """The bundle's own script on the bundle, in a fresh isolated process with numpy only."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bundle.zip").write_bytes(bundle)
    with zipfile.ZipFile(io.BytesIO(bundle)) as z:
        (folder / "check_bundle.py").write_bytes(z.read("check_bundle.py"))
    command = [str(numpy_python()), "-I", "check_bundle.py", "bundle.zip"]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)


def changed(bundle: bytes, name: str, edit: Any, manifest: bool = True) -> bytes:
    """The bundle with one file edited (and, unless told, the manifest's hash of it updated to match)."""
    with zipfile.ZipFile(io.BytesIO(bundle)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files[name] = json.dumps(edit(json.loads(files[name]))).encode()
    if manifest:
        m = json.loads(files["manifest.json"])
        m["files"][name] = hashlib.sha256(files[name]).hexdigest()
        files["manifest.json"] = json.dumps(m).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    return out.getvalue()


def labels_of(model: torch.nn.Module, inputs: list[Any]) -> list[int]:
    with torch.no_grad():
        return model(torch.tensor(inputs, dtype=torch.float32)).argmax(-1).tolist()


def test_bundles_check_out_alone_and_tampering_fails(owner: Trained) -> None:
    base, h = f"/api/v1/models/{owner.job_id}", owner.headers
    knockoff, independent = thief_models(owner)
    challenge = owner.client.get(f"{base}/challenge", headers=h).json()
    assert challenge["commitment"]["generation"] == 0
    runs = {}
    for name, model in (("knockoff", knockoff), ("independent", independent)):
        r = owner.client.post(
            f"{base}/verify", json={"answers": labels_of(model, challenge["inputs"])}, headers=h
        )
        assert r.status_code == 200, r.text
        runs[name] = r.json()
    assert runs["knockoff"]["verdict"] == "copy" and runs["independent"]["verdict"] == "not_shown", runs

    bundles = {}
    for name, run in runs.items():
        r = owner.client.get(f"{base}/verifications/{run['verification']}/bundle", headers=h)
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
        bundles[name] = r.content
        done = check(r.content, owner.tmp / f"bundle-{name}")
        assert done.returncode == 0, done.stdout + done.stderr
        assert (
            f"verdict {run['verdict']} at alpha 0.01" in done.stdout
            and "the bundle checks out" in done.stdout
        )

    with zipfile.ZipFile(io.BytesIO(bundles["knockoff"])) as z:
        names = set(z.namelist())
        secret = json.loads(z.read("secret.json"))["secret"]
    assert {
        "commitment.json",
        "secret.json",
        "challenge.npz",
        "answers.json",
        "null.json",
        "test.json",
    } <= names
    assert {"verdict.json", "manifest.json", "check_bundle.py"} <= names and "request_log.json" not in names
    assert hashlib.sha256(bytes.fromhex(secret)).hexdigest() == challenge["commitment"]["sha256"]

    def flip_first(a: dict[str, Any]) -> dict[str, Any]:
        return a | {"labels": [(a["labels"][0] + 1) % 10, *a["labels"][1:]]}

    tampered = {
        "one changed answer": (changed(bundles["knockoff"], "answers.json", flip_first), "agreement"),
        "one changed answer, manifest kept": (
            changed(bundles["knockoff"], "answers.json", flip_first, manifest=False),
            "answers.json: its sha256",
        ),
        "a wrong secret": (
            changed(bundles["knockoff"], "secret.json", lambda s: s | {"secret": "ab" * 32}),
            "does not hash to the commitment",
        ),
    }
    for what, (bundle, message) in tampered.items():
        done = check(bundle, owner.tmp / "tampered")
        assert done.returncode == 1 and message in done.stdout, (what, done.stdout, done.stderr)

    # the revealed challenge is retired: a fresh one, committed now, on which the knockoff is caught too
    fresh = owner.client.get(f"{base}/challenge", headers=h).json()
    assert fresh["commitment"]["generation"] == 1
    assert fresh["commitment"]["sha256"] != challenge["commitment"]["sha256"]
    assert fresh["inputs"] != challenge["inputs"] and len(fresh["inputs"]) == 512
    r = owner.client.post(f"{base}/verify", json={"answers": labels_of(knockoff, fresh["inputs"])}, headers=h)
    assert r.status_code == 200 and r.json()["verdict"] == "copy", r.text
    assert r.json()["commitment"] == fresh["commitment"]
    # a second bundle of a retired challenge retires nothing more
    again = owner.client.get(f"{base}/verifications/{runs['knockoff']['verification']}/bundle", headers=h)
    assert again.status_code == 200 and again.content == bundles["knockoff"]
    assert owner.client.get(f"{base}/challenge", headers=h).json()["commitment"] == fresh["commitment"]
    assert_problem(
        owner.client.get(f"{base}/verifications/00000000-0000-0000-0000-000000000000", headers=h), 404
    )


def test_an_endpoints_bundle_holds_its_request_log(owner: Trained) -> None:
    knockoff, _ = thief_models(owner)
    shape = tuple(load_dataset("mnist1d", **DATA).input_shape)
    model = export_onnx(knockoff, shape, owner.tmp / "bundle-knockoff.onnx")
    with json_server(model, owner.tmp) as url:
        v = finished(owner, start(owner, {"url": f"{url}/predict", "protocol": "json"}))
    assert v["status"] == "done" and v["result"]["verdict"] == "copy", v
    r = owner.client.get(v["bundle"], headers=owner.headers)
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        log = json.loads(z.read("request_log.json"))
        answers = json.loads(z.read("answers.json"))
    assert len(log) == v["requests"] == 8 and sum(e["rows"] for e in log) == 512
    assert all(e["status"] == 200 and len(e["request_sha256"]) == len(e["answer_sha256"]) == 64 for e in log)
    assert answers["suspect"].startswith(f"endpoint {url}/predict")
    done = check(r.content, owner.tmp / "bundle-endpoint")
    assert done.returncode == 0 and "verdict copy" in done.stdout, done.stdout + done.stderr
