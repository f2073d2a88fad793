"""The evidence secret: generated per job, kept server-side, committed to (sha256 + time) in the report.

Everything an owner's evidence rests on (the key of keyed answers, the seed of the challenge set) is
derived from one random secret, so committing to its hash before the model is served timestamps all
of it: a forged claim made later with transferable adversarial inputs cannot match the commitment.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

SECRET_BYTES = 32


@dataclass(frozen=True)
class Secret:
    """The secret's bytes (never printed, never served) and when it was committed to."""

    value: bytes = field(repr=False)
    committed_at: str

    @classmethod
    def new(cls) -> Secret:
        """A fresh random secret (32 bytes from the OS), committed now."""
        return cls(secrets.token_bytes(SECRET_BYTES), _now())

    @classmethod
    def benchmark(cls, base_seed: int) -> Secret:
        """A deterministic secret for benchmarks and the CLI: reproducible, hence not secret (and its
        commitment carries no time: the same audit gives the same report)."""
        return cls(hashlib.sha256(f"cmim benchmark evidence {base_seed}".encode()).digest(), "benchmark")

    def derive(self, purpose: str) -> int:
        """A 63-bit seed for one use of the secret (`purpose` separates uses)."""
        return int.from_bytes(hashlib.sha256(self.value + b"/" + purpose.encode()).digest()[:8], "big") >> 1

    def commitment(self) -> dict[str, str]:
        """{sha256 of the secret, when it was committed}: publishable, reveals nothing of the secret."""
        return {"sha256": hashlib.sha256(self.value).hexdigest(), "committed_at": self.committed_at}

    def to_json(self) -> dict[str, str]:
        """For the server-side store only."""
        return {"secret": self.value.hex(), "committed_at": self.committed_at}

    @classmethod
    def from_json(cls, d: dict[str, str]) -> Secret:
        return cls(bytes.fromhex(d["secret"]), d["committed_at"])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
