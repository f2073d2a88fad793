"""Content-addressed artifact store over fsspec: `objects/sha256/ab/cdef...` (file:// default, s3:// too).

Bytes are written to a temporary name while they are hashed, then moved to their address, so a
reader never sees a half-written object and the same content is stored once.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from app.core.config import Settings

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredObject:
    key: str  # path inside the store: objects/sha256/ab/cdef...
    sha256: str
    size: int


def object_key(sha256: str) -> str:
    return f"objects/sha256/{sha256[:2]}/{sha256[2:]}"


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
            if self.fs.exists(self._path(key)):
                self.fs.rm(tmp)
            else:
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

    def open(self, key: str) -> IO[bytes]:
        return self.fs.open(self._path(key), "rb")

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with self.open(key) as f:
            yield from read_chunks(f)

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def delete(self, key: str) -> None:
        self.fs.rm(self._path(key))

    def local_path(self, key: str) -> Path:
        """A local file with the object's bytes: the object itself on file://, else a cached copy."""
        if isinstance(self.fs, LocalFileSystem):
            return Path(self._path(key))
        local = self.cache_dir / key
        if not local.exists():  # objects are immutable, so a cached copy never goes stale
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}")
            with self.open(key) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            tmp.replace(local)
        return local
