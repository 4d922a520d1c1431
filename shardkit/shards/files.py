"""Opening and checking the files of a build: regular files only, read no further than their recorded size."""

from __future__ import annotations

import hashlib
import os
import stat
from typing import IO, Any

from shardkit.errors import ShardError
from shardkit.storage import is_local

CHUNK = 1 << 20


def open_regular(fs: Any, path: str) -> IO[bytes]:
    """``path`` opened for reading; :class:`ShardError` when it is missing or not a regular file (a FIFO, a
    device, a folder), which could block or never end."""
    if is_local(fs):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise ShardError(f"{path} is missing") from None
        if not stat.S_ISREG(mode):
            raise ShardError(f"{path} is not a regular file")
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise ShardError(f"{path} is missing") from None


def read_checked(fs: Any, path: str, size: int, sha256: str, *, keep: bool = False) -> bytes:
    """Check ``path`` against its recorded size and sha256, reading at most ``size + 1`` bytes.

    Returns the bytes when ``keep`` (else only the first 512, for a format check);
    :class:`ShardError` naming the file when it differs.
    """
    digest = hashlib.sha256()
    read = 0
    kept: list[bytes] = []
    with open_regular(fs, path) as f:
        while read <= size and (chunk := f.read(min(CHUNK, size + 1 - read))):
            digest.update(chunk)
            read += len(chunk)
            if keep or not kept:
                kept.append(chunk if keep else chunk[:512])
    if read != size:
        more = "more than" if read > size else "only"
        raise ShardError(f"{path} has {more} {min(read, size)} bytes, the manifest says {size}: truncated or replaced")
    if digest.hexdigest() != sha256:
        raise ShardError(f"{path} does not match its sha256 in the manifest: corrupt or replaced")
    return b"".join(kept)
