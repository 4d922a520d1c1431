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


CREDENTIAL_ERRORS = (
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "DefaultCredentialsError",
)


def credentials_problem(exc: BaseException) -> str | None:
    """A plain sentence when ``exc`` says an object store has no usable credentials, else None."""
    if type(exc).__name__ not in CREDENTIAL_ERRORS:
        return None
    return (
        f"no usable credentials for the object store ({exc}); set them as its client expects "
        "(for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    )


def resolved(location: str) -> str:
    """One spelling of ``location``: a local path absolute, its links, ``.`` and ``..`` resolved; a URL with its path
    normalised (``s3://b/x/`` and ``s3://b/x/.`` are ``s3://b/x``)."""
    fs, path = open_fs(location)
    if is_local(fs):
        return os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{posixpath.normpath(path)}"


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def parent(location: str) -> str:
    """The folder holding ``location`` (a local path or a URL)."""
    head = location.rstrip("/").rsplit("/", 1)[0] if "/" in location.rstrip("/") else "."
    return head or "/"


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


class AtomicFile:
    """A file that appears complete at ``commit()`` or not at all (``discard()``).

    Locally it is written beside its final name and renamed; on object stores
    the upload is published by ``close`` and aborted by ``discard``.
    """

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        self.local = is_local(fs)
        if self.local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.file: IO[bytes] = open(path + PARTIAL_SUFFIX, "wb")
        else:
            self.file = fs.open(path, "wb")

    def commit(self, *, unless_sha256: str | None = None) -> None:
        """Publish the file; with ``unless_sha256``, keep an existing local file that already has those bytes."""
        if not self.local:
            self.file.close()
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        tmp = self.path + PARTIAL_SUFFIX
        if unless_sha256 and os.path.exists(self.path) and _sha256_of(self.path) == unless_sha256:
            os.remove(tmp)  # a complete copy from an interrupted run: keep it as it is
        else:
            try:
                os.replace(tmp, self.path)
            except OSError as exc:  # e.g. the path is a folder: nothing is left behind, and the error names the path
                os.remove(tmp)
                raise type(exc)(exc.errno, exc.strerror, self.path) from None

    def discard(self) -> None:
        """Drop what was written."""
        if self.local:
            self.file.close()
            if os.path.exists(self.path + PARTIAL_SUFFIX):
                os.remove(self.path + PARTIAL_SUFFIX)
        elif hasattr(self.file, "discard"):
            self.file.discard()
            try:
                self.file.closed = True  # so that closing it later publishes nothing
            except AttributeError:  # files that cannot be marked closed never publish unless closed
                pass


def hash_stream(f: IO[bytes], digest: Any = None) -> tuple[int, Any]:
    """Feed the rest of ``f`` to ``digest`` (a new sha256 by default); the bytes read and the digest."""
    digest = digest or hashlib.sha256()
    read = 0
    while chunk := f.read(1 << 20):
        digest.update(chunk)
        read += len(chunk)
    return read, digest


def _sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hash_stream(f)[1].hexdigest()


@contextmanager
def atomic_write(fs: Any, path: str) -> Iterator[IO[bytes]]:
    """Write ``path`` so that it appears complete or not at all."""
    target = AtomicFile(fs, path)
    try:
        yield target.file
    except BaseException:
        target.discard()
        raise
    target.commit()


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_write(fs, path) as f:
        f.write(data)
