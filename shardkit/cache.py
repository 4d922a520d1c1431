"""The cache folder: what shardkit makes once and every later process reads (a tokenizer built by transformers).

The folder is ``$SHARDKIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/shardkit``, else ``~/.cache/shardkit``.
An entry is the folder ``<kind>/<key>``, its key a fingerprint of everything it is made from, so a changed
source makes a new entry and never reads a stale one. Each entry holds ``entry.json``: the sha256 of each of its
files. An entry whose files do not match it (truncated, edited, half-deleted) is made again. Entries are made in a
scratch folder and renamed into place, so processes making one at once (torchrun ranks, build workers) never see
it half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

#: the environment variable naming the cache folder (tests point it at a temporary folder)
CACHE_ENV = "SHARDKIT_CACHE_DIR"
ENTRY_FILE = "entry.json"


def cache_root() -> Path:
    """``$SHARDKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/shardkit``, else ``~/.cache/shardkit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "shardkit"
    return Path.home() / ".cache" / "shardkit"


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entry_folder(kind: str, key: str) -> Path:
    """Where the entry ``key`` of ``kind`` lives (whether or not it exists)."""
    return cache_root() / kind / key


def read_entry(kind: str, key: str, names: tuple[str, ...]) -> Path | None:
    """The folder of a sound entry (every file listed in its ``entry.json``, with that sha256, ``names`` among
    them), else None."""
    folder = entry_folder(kind, key)
    try:
        listed = json.loads((folder / ENTRY_FILE).read_text())
        files = listed["files"]
        if (
            listed["key"] != key
            or not set(names) <= files.keys()
            or not all(sha256_file(folder / n) == h for n, h in files.items())
        ):
            logger.info("the cache entry %s is damaged; it is made again", folder)
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folder


def cached(kind: str, key: str, names: tuple[str, ...], make: Callable[[Path], None]) -> Path:
    """The folder of entry ``key`` of ``kind``, holding the files ``names``: read when sound, else made by
    ``make(folder)`` (which writes the entry's files into the empty ``folder`` it is given) and put in place.
    Raises ``OSError`` when the cache folder cannot be written."""
    if (found := read_entry(kind, key, names)) is not None:
        return found
    folder = entry_folder(kind, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        make(scratch)
        files = {p.name: sha256_file(p) for p in sorted(scratch.iterdir()) if p.is_file()}
        (scratch / ENTRY_FILE).write_text(json.dumps({"key": key, "files": files}, indent=1) + "\n")
        if folder.exists():  # damaged, or just put in place by another process
            if (found := read_entry(kind, key, names)) is not None:
                return found
            shutil.rmtree(folder, ignore_errors=True)
        try:
            scratch.rename(folder)
        except OSError:  # another process put its entry in place first
            if (found := read_entry(kind, key, names)) is None:
                raise
            return found
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder
