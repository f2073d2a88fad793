"""Secrets the service keeps to use again (a remote endpoint's request headers), encrypted at rest with
Fernet (AES-128-CBC + HMAC-SHA256, `cryptography`) under one key: `CMIM_SECRET_KEY` (a Fernet key, the
same on every API process; production settings refuse to start without it), or in the embedded default
a key generated once and kept in `CMIM_SECRET_KEY_FILE` (mode 0600) beside the data."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from app.core.config import Settings


class SecretBox:
    """Encrypts and decrypts small JSON values under the service's key."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        if settings.secret_key:
            return cls(settings.secret_key.encode())
        return cls(_embedded_key(Path(settings.secret_key_file)))

    def seal(self, value: object) -> bytes:
        return self._fernet.encrypt(json.dumps(value).encode())

    def open(self, token: bytes) -> object:
        """The value sealed in token; ValueError when the key is not the one it was sealed with."""
        try:
            return json.loads(self._fernet.decrypt(token))
        except InvalidToken:
            raise ValueError("sealed with another key (CMIM_SECRET_KEY changed?)") from None


def _embedded_key(path: Path) -> bytes:
    """The embedded mode's key: read from path, or made there once (0600; written whole to a temporary
    file, then linked into place, so a concurrent reader never sees half a key and the first maker wins)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes().strip()
