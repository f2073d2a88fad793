"""Training keeps the memory its steps free: far fewer page faults, the same numbers."""

import json
import subprocess
import sys

PROBE = """
import json, resource, sys, torch
from ml.attacks import ATTACKS
from ml.audit import AuditConfig, Run, train_lockstep
from ml.data import load_dataset
from ml.models import build_model
from ml.oracle import Oracle
from ml.train import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
data = load_dataset("mnist1d", num_train=1000, num_test=2000)
torch.manual_seed(0)
teacher = build_model("cnn1d", data.input_shape, data.num_classes).eval()
runs = [Run(f"ls{i}", "mlp", eps=0.1) for i in range(20)]
for i in range(10):
    runs += [Run(f"{k}{i}", "mlp", teacher="t", attack=ATTACKS.get(k)(10, None)) for k in ("kd", "fm")]
cfg = AuditConfig(epochs=3, seeds=1, control=False, device="cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
train_lockstep(runs, data, {"t": Oracle(teacher)}, cfg, 0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults, "acc": [r.acc for r in runs]}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_cuts_page_faults_and_changes_no_number() -> None:
    default, kept = _probe("default"), _probe("keep")
    assert kept["kept"] is True  # glibc: this machine's C library
    assert kept["faults"] < 0.6 * default["faults"], (kept["faults"], default["faults"])
    assert kept["acc"] == default["acc"]
