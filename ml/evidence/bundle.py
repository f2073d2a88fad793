"""The evidence bundle: one zip an owner can hand to an expert, who re-checks the claim without cmim.

It holds the commitment (sha256 of the secret and when it was made), the revealed secret, the challenge
(inputs and the teacher's labels on them), the suspect's answers (and for an endpoint the log of every
request with the sha256 of each request and answer body), the null's agreements (independent models per
family), the test, the verdict, a manifest of every file's sha256, and `check_bundle.py`: a numpy-only
script that recomputes the verdict from the bundle and checks the secret against the commitment.
Revealing the secret retires the challenge it seeded (the service commits a fresh one).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

from ml.evidence.base import Challenge
from ml.evidence.secret import Secret
from ml.evidence.verify import pack_challenge

CHECK_SCRIPT = Path(__file__).with_name("check_bundle.py")
FORMAT = "cmim-evidence-bundle/1"
FIXED_TIME = (2000, 1, 1, 0, 0, 0)  # zip entries carry no wall-clock time: the same evidence, the same bytes

TEST = {
    "statistic": "agreement: the share of challenge inputs on which the suspect gives the teacher's label",
    "null": "per family of independent models (same data, other seeds, one training recipe each): a new "
    "independent model agrees mean + s * sqrt(1 + 1/n) * t_(n-1), s the family's std floored at the "
    "binomial std sqrt(max(m (1 - m), 1/M) / M) of the M challenge inputs",
    "p_value": "the largest over families of P(t_(n-1) >= (agreement - mean) / (s * sqrt(1 + 1/n)))",
    "verdict": "copy when p < alpha, else not_shown (which is no proof of innocence)",
}


def build_bundle(
    *, secret: Secret, generation: int, challenge: Challenge, answers: list[int], suspect: str,
    null: dict[str, list[float]], alpha: float, verdict: dict[str, Any], context: dict[str, Any],
    request_log: list[dict[str, Any]] | None = None,
) -> bytes:  # fmt: skip
    """The zip's bytes. `null` holds each family's agreements; `context` says whose model and which
    verification (ids, the challenge's mechanism, and what the null was measured on)."""
    files: dict[str, bytes] = {
        "commitment.json": _json(secret.commitment() | {"generation": generation}),
        "secret.json": _json(secret.to_json()),
        "challenge.npz": pack_challenge(challenge),
        "answers.json": _json({"suspect": suspect, "labels": [int(a) for a in answers]}),
        "null.json": _json({"families": null, "points": len(challenge.labels)}),
        "test.json": _json(TEST | {"alpha": alpha}),
        "verdict.json": _json(verdict),
        "check_bundle.py": CHECK_SCRIPT.read_bytes(),
    }
    if request_log is not None:
        files["request_log.json"] = _json(request_log)
    manifest = {
        "format": FORMAT,
        "context": context,
        "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()},
        "how_to_check": "python check_bundle.py THIS.zip  (Python 3.11+ and numpy only)",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {"manifest.json": _json(manifest), **files}.items():
            z.writestr(zipfile.ZipInfo(name, FIXED_TIME), data, zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True).encode()
