"""What a build task read: each image file's size, modification time and content hash.

A task records every image file it tried to read (a missing one as ``None``)
in its result. A rerun re-checks them: a ``stat`` first, and the content hash
only when the size or time differ, so an unchanged build costs one ``stat``
per image. A task whose images changed, appeared or disappeared is built
again. Inline images are part of the input (its hash is in the build
identity); http(s) images are recorded with their hash but not fetched again.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any

from shardkit.storage import hash_stream

#: ``{key: {"size", "mtime", "sha256"} | None}``: what one task read (None: the file was missing)
Ledger = dict[str, dict[str, Any] | None]


def file_stamp(fs: Any, path: str, *, local: bool) -> dict[str, Any] | None:
    """Size and modification time of the regular file at ``path``; None when there is none."""
    try:
        if local:
            st = os.stat(path)
            return {"size": st.st_size, "mtime": st.st_mtime_ns} if stat.S_ISREG(st.st_mode) else None
        info = fs.info(path)
    except (OSError, ValueError):
        return None
    if info.get("type") != "file":
        return None
    changed = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("updated")
    return {"size": info.get("size"), "mtime": str(changed)}


def record_read(ledger: Ledger, key: str, stamp: dict[str, Any] | None, data: bytes | None) -> None:
    """Note that ``key`` was read (``stamp`` taken before reading, ``data`` its bytes; None: not found)."""
    if data is None or stamp is None:
        ledger[key] = None
    else:
        ledger[key] = {**stamp, "sha256": hashlib.sha256(data).hexdigest()}


def changed_images(fs: Any, ledger: Ledger, *, local: bool) -> list[str]:
    """The files of ``ledger`` that differ now (content changed, appeared or disappeared)."""
    out = []
    for key, was in ledger.items():
        if key.startswith(("http://", "https://")):
            continue  # remote downloads are not repeated (documented)
        now = file_stamp(fs, key, local=local)
        if (was is None) != (now is None):
            out.append(key)
        elif was is not None and now is not None and (now["size"], now["mtime"]) != (was["size"], was["mtime"]):
            if now["size"] != was["size"] or _sha256(fs, key, local=local) != was["sha256"]:
                out.append(key)
    return out


def _sha256(fs: Any, path: str, *, local: bool) -> str | None:
    try:
        with open(path, "rb") if local else fs.open(path, "rb") as f:
            return hash_stream(f)[1].hexdigest()
    except OSError:
        return None
