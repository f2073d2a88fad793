"""Evidence of theft: tests an owner can run on a suspect model to show it was distilled from theirs.

Modules, one concept each: secret (the per-job secret and its commitment), base (challenge sets),
stats (the test against independent models), fingerprint, keyed and selected (the mechanisms), heldout
(the selected challenge's section, chosen on even seeds and measured on odd ones), nulls (independent
models of other architectures), registry, audit (the report's section), verify.
"""

from ml.evidence.audit import EVIDENCE_LIMITS
from ml.evidence.base import Challenge, Mechanism
from ml.evidence.bundle import build_bundle
from ml.evidence.keyed import KeyedRegion, fit_keyed
from ml.evidence.registry import CHALLENGE_POINTS, DEFAULT_MECHANISM, MECHANISMS
from ml.evidence.secret import Secret
from ml.evidence.stats import ALPHA, Null, NullModel, loo_fpr
from ml.evidence.verify import (
    evidence_note,
    mechanism_null,
    null_families,
    null_from_report,
    pack_challenge,
    predicted_labels,
    selected_challenge,
    selected_names,
    store_names,
    unpack_challenge,
    verdict,
)

__all__ = [
    "ALPHA", "CHALLENGE_POINTS", "DEFAULT_MECHANISM", "EVIDENCE_LIMITS", "MECHANISMS", "Challenge",
    "KeyedRegion", "Mechanism", "Null", "NullModel", "Secret", "build_bundle", "evidence_note", "fit_keyed",
    "loo_fpr", "mechanism_null", "null_families", "null_from_report", "pack_challenge", "predicted_labels",
    "selected_challenge", "selected_names", "store_names", "unpack_challenge", "verdict",
]  # fmt: skip
