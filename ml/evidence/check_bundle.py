"""Check a cmim evidence bundle without cmim: python check_bundle.py BUNDLE.zip (or an unpacked folder).

Needs Python 3.11+ and numpy only (the Student t tail is computed here, by the regularized incomplete beta
function). It checks, and says which check fails (exit status 1):
1. every file is the one the manifest lists (sha256);
2. the revealed secret hashes to the commitment (sha256), made before the model was served;
3. the suspect's agreement with the teacher's labels on the challenge, recomputed from the answers;
4. the p-value against the null of independent models (per family: mean, std, n; the scale floored at
   the binomial std of the challenge; a suspect must out-agree every family), and the verdict at alpha.
It prints the recomputed figures; exit status 0 when all match the bundle's verdict.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

TOLERANCE = 1e-6


def read_bundle(path: str) -> dict[str, bytes]:
    """Every file of the bundle by name (a zip, or a folder it was unpacked to)."""
    p = Path(path)
    if p.is_dir():
        return {f.name: f.read_bytes() for f in p.iterdir() if f.is_file()}
    with zipfile.ZipFile(p) as z:
        return {n: z.read(n) for n in z.namelist()}


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(ln) * _beta_cf(b, a, 1.0 - x) / b


def t_sf(t: float, df: int) -> float:
    """P(T >= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def p_value(
    agreement: float, families: dict[str, list[float]], points: int
) -> tuple[float, dict[str, float]]:
    """The test's p: the largest over families of P(an independent model of the family agrees >= a)."""
    per_family = {}
    for name, values in families.items():
        a = np.asarray(values, dtype=np.float64)
        if len(a) < 2:
            continue
        mean, std, n = float(a.mean()), float(a.std(ddof=1)), len(a)
        m = min(max(mean, 0.0), 1.0)
        floor = math.sqrt(max(m * (1 - m), 1.0 / points) / points)
        scale = max(std, floor) * math.sqrt(1 + 1 / n)
        per_family[name] = t_sf((agreement - mean) / scale, n - 1)
    if not per_family:
        raise ValueError("the null holds no family of 2 independent models")
    return max(per_family.values()), per_family


def check(files: dict[str, bytes]) -> list[str]:
    """The checks that fail (none: the bundle holds up), printing what was recomputed."""
    failures = []
    manifest = json.loads(files["manifest.json"])
    for name, digest in manifest["files"].items():
        if name not in files:
            failures.append(f"{name}: listed in the manifest, missing from the bundle")
        elif hashlib.sha256(files[name]).hexdigest() != digest:
            failures.append(f"{name}: its sha256 is not the manifest's (the file was changed)")
    commitment, secret = json.loads(files["commitment.json"]), json.loads(files["secret.json"])
    if hashlib.sha256(bytes.fromhex(secret["secret"])).hexdigest() != commitment["sha256"]:
        failures.append("secret.json: the secret does not hash to the commitment")
    with np.load(io.BytesIO(files["challenge.npz"]), allow_pickle=False) as z:
        labels = z["labels"]
    answers = np.asarray(json.loads(files["answers.json"])["labels"])
    verdict, null, test = (json.loads(files[n]) for n in ("verdict.json", "null.json", "test.json"))
    if answers.shape != labels.shape:
        return [*failures, f"answers.json: {answers.shape[0]} answers for {labels.shape[0]} challenge inputs"]
    agreement = float((answers == labels).mean())
    p, per_family = p_value(agreement, null["families"], len(labels))
    call = "copy" if p < test["alpha"] else "not_shown"
    print(f"agreement {agreement:.6f} (bundle {verdict['agreement']:.6f}) on {len(labels)} challenge inputs")
    print(f"p-value {p:.6g} (bundle {verdict['p_value']:.6g}); per family {json.dumps(per_family)}")
    print(f"verdict {call} at alpha {test['alpha']} (bundle {verdict['verdict']})")
    if abs(agreement - verdict["agreement"]) > TOLERANCE:
        failures.append("answers.json: the agreement recomputed from the answers is not the verdict's")
    if abs(p - verdict["p_value"]) > TOLERANCE * max(1.0, abs(verdict["p_value"])) and not (
        p < 1e-12 and verdict["p_value"] < 1e-12
    ):
        failures.append("verdict.json: the p-value recomputed from the null is not the verdict's")
    if call != verdict["verdict"]:
        failures.append(
            f"verdict.json: the recomputed verdict is {call}, the bundle says {verdict['verdict']}"
        )
    return failures


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    failures = check(read_bundle(argv[1]))
    for f in failures:
        print(f"FAILED: {f}")
    print("the bundle checks out" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
