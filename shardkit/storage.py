"""Where builds live: local folders or any fsspec URL, with atomic writes.

A local file is written under a temporary name beside its final one and
renamed when complete; object stores publish an object only when its upload
completes, so there the final name is written directly.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PARTIAL_SUFFIX = ".partial"


def open_fs(url: str) -> tuple[Any, str]:
    """The filesystem and path of ``url`` (a local path or e.g. ``s3://bucket/prefix``)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


class HashingWriter:
    """A write-only file wrapper that counts bytes and hashes them as they pass."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.bytes = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self.f.flush()

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        """Closing is the owner's job (it publishes the file); writers that close their sink are ignored."""


@contextmanager
def atomic_write(fs: Any, path: str) -> Iterator[IO[bytes]]:
    """Write ``path`` so that it appears complete or not at all."""
    if not is_local(fs):
        with fs.open(path, "wb") as f:
            yield f
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + PARTIAL_SUFFIX
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_write(fs, path) as f:
        f.write(data)
