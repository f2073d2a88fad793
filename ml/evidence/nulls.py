"""Independent models of other architectures for the evidence null (Dataset Inference's critique: a null of
one architecture says nothing of a suspect of another).

Beside its LS students (the audited student architectures), the audit trains `AuditConfig.null_models`
independent models per seed of each null family (each from its own seed, `null_seed`): by default the
zoo's other small student families that fit the input (`mlp`, `cnn1d_small` on sequences, `cnn2d` on
images), and any the owner names in `AuditConfig.null_archs`: a zoo architecture, or a scikit-learn model
(`logistic`: multinomial logistic regression; `forest`: a random forest of 50 trees), fitted on a
bootstrap of the attacker's labelled data drawn from the seed. They are trained with the data's labels
only, plainly (no label smoothing), in a task of their own (`ml.audit.tasks`), so they change none of the
students' figures and a null changed after an audit trains only the null. The report gives the
false-positive rate per family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ml.data import Dataset
from ml.evidence.stats import MIN_FAMILY
from ml.models import MODELS

STUDENT_FAMILIES = ("mlp", "cnn1d_small", "cnn2d")  # the zoo's small student families
SKLEARN_NULLS = ("logistic", "forest")
NULL_ROW = "null"  # the row name of a null family's independent model (its arch field names the family)


def null_row(k: int) -> str:
    """The row name of a family's k-th independent model of a seed: "null", "null_1", "null_2", ..."""
    return NULL_ROW if k == 0 else f"{NULL_ROW}_{k}"


def is_null_row(row: str) -> bool:
    return row == NULL_ROW or row.startswith(NULL_ROW + "_")


def null_seed(seed: int, k: int) -> int:
    """The seed of a family's k-th independent model of the audit seed `seed`: the seed itself for the
    first (the one model per seed audits had before), far from every audit seed for the others."""
    return seed if k == 0 else seed + 1_000_003 * k


def check_null_family(name: str) -> str:
    """The name, when it is a zoo architecture or a scikit-learn null (ValueError naming the choices)."""
    if name not in SKLEARN_NULLS and name not in MODELS.names():
        choices = ", ".join([*MODELS.names(), *SKLEARN_NULLS])
        raise ValueError(f"unknown null family {name!r}; valid choices: {choices}")
    return name


def default_null_families(students: Sequence[str], input_shape: Sequence[int]) -> list[str]:
    """The zoo's small student families that fit `input_shape` and are not among the audited students."""
    out = []
    for name in STUDENT_FAMILIES:
        if name in students or name not in MODELS.names():
            continue
        try:  # the registered builder checks the input shape first
            MODELS.get(name)(tuple(input_shape), 2)
        except ValueError:
            continue
        out.append(name)
    return out


def sklearn_null(name: str, data: Dataset, seed: int) -> tuple[Callable[[Tensor], Tensor], float]:
    """A scikit-learn null model fitted on a bootstrap of data's train split: (predict labels, test
    accuracy in %)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    x = data.x_train.reshape(len(data.x_train), -1).cpu().numpy()
    idx = rng.integers(len(x), size=len(x))
    if name == "logistic":
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, random_state=seed))
    else:
        model = RandomForestClassifier(n_estimators=50, n_jobs=1, random_state=seed)
    model.fit(x[idx], data.y_train.cpu().numpy()[idx])

    def predict(q: Tensor) -> Tensor:
        return torch.from_numpy(model.predict(q.reshape(len(q), -1).cpu().numpy()).astype(np.int64))

    acc = 100.0 * float((predict(data.x_test) == data.y_test.cpu()).float().mean())
    return predict, acc


def uncovered(
    evidence: dict[str, Any] | None, mechanism: str = "fingerprint", box: str = "teacher"
) -> str | None:
    """In words, the null families too small to enter the widest null (fewer than MIN_FAMILY models) whose
    models that null called copies: a suspect of such an architecture is not covered. None: no such family."""
    per_arch = ((evidence or {}).get("mechanisms", {}).get(mechanism) or {}).get(box) or {}
    found: dict[str, tuple[int, float]] = {}
    for sec in per_arch.values():
        other = sec.get("other_architectures") or {}
        for f, rate in (other.get("fpr_by_family") or {}).items():
            n = len(other.get("negatives", {}).get(f, []))
            if f not in sec["negatives"] and rate and n < MIN_FAMILY:
                found[f] = (n, max(rate, found.get(f, (0, 0.0))[1]))
    if not found:
        return None
    what = ", ".join(f"{f} ({n} models, {rate:.0%} called copies)" for f, (n, rate) in found.items())
    return (
        f"The null does not cover {what}: independent models of that architecture agree with the teacher "
        f"more than the audit's own students do, and fewer than {MIN_FAMILY} are too few to enter the null "
        "(an audit with more seeds trains more); a suspect of that architecture may be called a copy wrongly."
    )
