"""Opening and checking the files of a build: regular files only, read no further than their recorded size."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from typing import IO, Any

from shardkit.errors import ShardAccessError, ShardError, ShardMissingError, ShardNetworkError
from shardkit.storage import credentials_problem, is_local

CHUNK = 1 << 20
NETWORK_ERRORS = {"HTTPClientError", "ClientConnectionError", "ClientPayloadError"}  # botocore's and aiohttp's bases


def reading_error(exc: BaseException, path: str) -> ShardError | None:
    """The error to raise when reading ``path`` failed with ``exc`` for a reason other than its bytes: the file
    is missing, may not be read (permission, object-store credentials) or the network failed; None otherwise."""
    if isinstance(exc, ShardError):
        return exc
    causes = [exc]  # clients wrap the cause: fsspec's HTTP filesystem says FileNotFoundError for a refused connection
    while (cause := causes[-1].__cause__ or causes[-1].__context__) is not None and len(causes) < 8:
        causes.append(cause)
    for cause in causes:
        if problem := credentials_problem(cause):
            return ShardAccessError(f"{path} cannot be read: {problem}")
        network = {c.__name__ for c in type(cause).__mro__} & NETWORK_ERRORS
        if network or isinstance(cause, (ConnectionError, TimeoutError, socket.gaierror)):
            return ShardNetworkError(f"{path} cannot be read: network error ({type(cause).__name__}: {cause})")
    if isinstance(exc, FileNotFoundError):
        return ShardMissingError(f"{path} is missing")
    if isinstance(exc, PermissionError):
        return ShardAccessError(f"{path} cannot be read: permission denied ({exc})")
    return None


def open_regular(fs: Any, path: str) -> IO[bytes]:
    """``path`` opened for reading; :class:`ShardError` when it is missing, may not be read, cannot be reached
    (:func:`reading_error`) or is not a regular file (a FIFO, a device, a folder), which could block or never end."""
    try:
        if is_local(fs) and not stat.S_ISREG(os.stat(path).st_mode):
            raise ShardError(f"{path} is not a regular file")
        return fs.open(path, "rb")
    except Exception as exc:
        if (error := reading_error(exc, path)) is None:
            raise
        raise error from None


def read_checked(fs: Any, path: str, size: int, sha256: str, *, keep: bool = False) -> bytes:
    """Check ``path`` against its recorded size and sha256, reading at most ``size + 1`` bytes.

    Returns the bytes when ``keep`` (else only the first 512, for a format check);
    :class:`ShardError` naming the file when it differs.
    """
    digest = hashlib.sha256()
    read = 0
    kept: list[bytes] = []
    with open_regular(fs, path) as f:
        try:
            while read <= size and (chunk := f.read(min(CHUNK, size + 1 - read))):
                digest.update(chunk)
                read += len(chunk)
                if keep or not kept:
                    kept.append(chunk if keep else chunk[:512])
        except Exception as exc:
            if (error := reading_error(exc, path)) is None:
                raise
            raise error from None
    if read != size:
        more = "more than" if read > size else "only"
        raise ShardError(f"{path} has {more} {min(read, size)} bytes, the manifest says {size}: truncated or replaced")
    if digest.hexdigest() != sha256:
        raise ShardError(f"{path} does not match its sha256 in the manifest: corrupt or replaced")
    return b"".join(kept)
