"""The evidence mechanisms, by name."""

from __future__ import annotations

from ml.evidence.base import Mechanism
from ml.evidence.fingerprint import Fingerprint
from ml.evidence.keyed import Keyed
from ml.evidence.selected import Selected
from ml.registry import Registry

MECHANISMS: Registry[Mechanism] = Registry("evidence mechanism")
MECHANISMS.register("fingerprint")(Fingerprint())
MECHANISMS.register("keyed")(Keyed())
MECHANISMS.register("selected")(Selected())
DEFAULT_MECHANISM = "fingerprint"
CHALLENGE_POINTS = 512
