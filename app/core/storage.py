"""Content-addressed artifact store over fsspec: `objects/sha256/ab/cdef...` (file:// default, s3:// too).

Bytes are written to a temporary name while they are hashed, then moved to their address, so a
reader never sees a half-written object and the same content is stored once.

Every read of an object is checked against the sha256 its address names: bytes changed after they
were written (a failing disk, a tamperer with access to the store) raise `CorruptObjectError` and log
an error naming the object; they are never returned.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from app.core.config import Settings

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
_ADDRESS = re.compile(r"objects/sha256/([0-9a-f]{2})/([0-9a-f]{62})")


class CorruptObjectError(Exception):
    """A stored object whose bytes do not hash to its address: changed or damaged after it was written."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(
            f"stored object {key} failed its integrity check: its bytes hash to sha256 {actual}, "
            f"not to the {expected} they were stored as"
        )
        self.key, self.expected, self.actual = key, expected, actual


@dataclass(frozen=True)
class StoredObject:
    key: str  # path inside the store: objects/sha256/ab/cdef...
    sha256: str
    size: int


def object_key(sha256: str) -> str:
    return f"objects/sha256/{sha256[:2]}/{sha256[2:]}"


def object_sha256(key: str) -> str:
    """The sha256 an object's key names (the inverse of `object_key`)."""
    match = _ADDRESS.fullmatch(key)
    if match is None:
        raise ValueError(f"{key!r} is not the key of a content-addressed object")
    return match[1] + match[2]


def _check_object(key: str, actual: str) -> None:
    """Raise CorruptObjectError, and log it for the operator, unless `actual` is the sha256 key names."""
    expected = object_sha256(key)
    if actual != expected:
        log.error(
            "integrity: stored object %s hashes to sha256 %s, not %s: changed since written",
            key,
            actual,
            expected,
        )
        raise CorruptObjectError(key, expected, actual)


def read_chunks(f: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in read_chunks(f):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    """Immutable objects addressed by their sha256 under an fsspec URL."""

    def __init__(
        self, url: str, cache_dir: str | Path = "var/cache", options: Mapping[str, Any] | None = None
    ) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **(options or {}))
        self.cache_dir = Path(cache_dir)

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        """The store the settings name (file:// or s3:// with its endpoint)."""
        return cls(settings.artifact_url, settings.cache_dir, settings.artifact_options)

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def put_chunks(self, chunks: Iterable[bytes]) -> StoredObject:
        """Store the concatenated chunks; returns their address, hash and size."""
        tmp = self._path(f"tmp/{uuid.uuid4().hex}")
        self.fs.makedirs(self._path("tmp"), exist_ok=True)
        h, size = hashlib.sha256(), 0
        try:
            with self.fs.open(tmp, "wb") as out:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            digest = h.hexdigest()
            key = object_key(digest)
            if self.fs.exists(self._path(key)) and self._intact(key):
                self.fs.rm(tmp)
            else:  # absent, or changed since it was written: these bytes put it right
                self.fs.makedirs(self._path(key).rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(tmp, self._path(key))
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        return StoredObject(key, digest, size)

    def put_file(self, path: str | Path) -> StoredObject:
        with open(path, "rb") as f:
            return self.put_chunks(read_chunks(f))

    def put_bytes(self, data: bytes) -> StoredObject:
        return self.put_chunks([data])

    def write_named(self, name: str, data: bytes) -> None:
        """A named object beside the content-addressed ones (an audit task's result); whole or absent."""
        tmp = self._path(f"tmp/{uuid.uuid4().hex}")
        self.fs.makedirs(self._path("tmp"), exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.makedirs(self._path(name).rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, self._path(name))

    def read_named(self, name: str) -> bytes | None:
        """A named object's bytes, None when there is none."""
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None

    def delete_named(self, name: str) -> None:
        """Delete a named object, or every named object under `name/`; nothing there is no error."""
        if self.fs.exists(self._path(name)):
            self.fs.rm(self._path(name), recursive=True)

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks, hashed as they go: the last chunk is held back until the whole
        has matched its address, so a reader never gets all of a changed object (CorruptObjectError)."""
        h, held = hashlib.sha256(), b""
        with self.fs.open(self._path(key), "rb") as f:
            for chunk in read_chunks(f):
                h.update(chunk)
                if held:
                    yield held
                held = chunk
        _check_object(key, h.hexdigest())
        if held:
            yield held

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes, checked against its address (CorruptObjectError)."""
        data = self.fs.cat_file(self._path(key))
        _check_object(key, hashlib.sha256(data).hexdigest())
        return data

    def verify(self, key: str) -> None:
        """Hash the whole object now (CorruptObjectError): before a response streaming it has begun."""
        for _ in self.iter_chunks(key):
            pass

    def _intact(self, key: str) -> bool:
        """Whether the stored object matches its address (a changed one is logged)."""
        try:
            self.verify(key)
        except CorruptObjectError:
            return False
        return True

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def delete(self, key: str) -> None:
        self.fs.rm(self._path(key))

    def local_path(self, key: str) -> Path:
        """A local file with the object's bytes, checked on every call (CorruptObjectError): the object itself
        on file://, else a cached copy, checked as it is fetched and again whenever it is handed out."""
        if isinstance(self.fs, LocalFileSystem):
            self.verify(key)
            return Path(self._path(key))
        local, expected = self.cache_dir / key, object_sha256(key)
        if local.exists():  # objects are immutable, so an intact cached copy never goes stale
            actual = sha256_file(local)
            if actual == expected:
                return local
            log.error(
                "integrity: the cached copy %s of %s hashes to sha256 %s, not %s; fetched again",
                local,
                key,
                actual,
                expected,
            )
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as dst:
                for chunk in self.iter_chunks(key):
                    dst.write(chunk)
            tmp.replace(local)
        finally:
            tmp.unlink(missing_ok=True)
        return local
