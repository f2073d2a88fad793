"""Capped streaming, the one way every request body that can be large is read (data sets, uploaded models,
predict bodies): refused with 413 as soon as its declared length, or the bytes read so far, pass the cap."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from app.problems import Problem


def _too_large(what: str, max_bytes: int, setting: str, size: str | None = None) -> Problem:
    of = f" of {size} bytes" if size is not None else ""
    return Problem(413, f"{what}{of} is over the {max_bytes:,}-byte limit ({setting})", slug="too-large")


async def capped(
    stream: AsyncIterator[bytes],
    max_bytes: int,
    declared: str | None = None,
    what: str = "upload",
    setting: str = "CMIM_UPLOAD_MAX_BYTES",
) -> AsyncIterator[bytes]:
    """The chunks of `stream`, refused with 413 before the first when the declared length (Content-Length)
    is over `max_bytes`, and the moment the bytes read pass it."""
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(what, max_bytes, setting, declared)
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(what, max_bytes, setting)
        yield chunk


async def read_capped(chunks: AsyncIterator[bytes]) -> bytes:
    """A capped stream (`capped`) read whole into memory."""
    return b"".join([chunk async for chunk in chunks])


async def spool(
    chunks: AsyncIterator[bytes],
    directory: Path,
    suffix: str,
    check_head: Callable[[bytes], None] | None = None,
    head_size: int = 4,
) -> tuple[Path, int]:
    """A capped stream (`capped`) written to a temporary file in `directory`; returns (path, size). The
    first `head_size` bytes go to `check_head` as soon as they arrive (it raises to refuse the body at once).
    The file is removed when anything fails."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=suffix)
    path, size, head = Path(name), 0, b""
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if check_head is not None and len(head) < head_size:
                    head += chunk[: head_size - len(head)]
                    if len(head) == head_size:
                        check_head(head)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size
