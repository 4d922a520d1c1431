"""Where an image's bytes come from: files inside the dataset root (local or fsspec), ``data:`` URIs, or URLs."""

from __future__ import annotations

import base64
import binascii
import errno
import http.client
import os
import posixpath
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shardkit.errors import RecordError
from shardkit.schema import InlineImage
from shardkit.storage import is_local, open_fs

DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024  # --max-image-bytes: the largest image file read
_FILE_KINDS = [
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


class ImageRoot:
    """Reads the images a record names: files inside the dataset root, inline data, or (opt-in) URLs.

    The root is a local folder or an fsspec URL (``s3://bucket/data``). A path
    is relative to the root (or, locally, an absolute path inside it); anything
    that leaves the root, through ``..``, an absolute path or a symbolic link,
    is refused. Only regular files are read (never a FIFO, a device or a
    folder), and none larger than ``max_image_bytes``, checked before reading.
    ``data:`` URIs carry the image itself (base64), an :class:`InlineImage` its
    bytes (as a Hugging Face input holds them). ``http(s)`` URLs are
    fetched only with ``allow_remote``, within ``timeout`` seconds in all (retries
    included), at most ``max_bytes`` (and ``max_image_bytes``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        allow_remote: bool = False,
        timeout: float = 10.0,
        max_bytes: int = 50_000_000,
        retries: int = 3,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ):
        self.root = str(root)
        fs, self.path = open_fs(self.root)
        self.local = is_local(fs)
        self.real_root = Path(self.path).resolve() if self.local else None
        self.allow_remote, self.timeout, self.max_bytes, self.retries = allow_remote, timeout, max_bytes, retries
        self.max_image_bytes = max_image_bytes

    @property
    def fs(self) -> Any:
        """The root's filesystem, made in this process (fsspec caches it per process: forked workers get their own)."""
        return open_fs(self.root)[0]

    def resolve(self, ref: str) -> str:
        """The file a path names; :class:`RecordError` when it leaves the root or cannot name a file."""
        if "\0" in ref:
            raise RecordError(f"image path {ref!r} contains a NUL byte", "image_path_invalid", detail={"image": ref})
        if self.local:
            return self._resolve_local(ref)
        if "://" in ref:
            ref_fs, ref_path = open_fs(ref)
            if type(ref_fs) is not type(self.fs):
                raise self._outside(ref)
            candidate = posixpath.normpath(ref_path)
        elif ref.startswith("/"):
            raise self._outside(ref)
        else:
            candidate = posixpath.normpath(posixpath.join(self.path, ref))
        if not candidate.startswith(self.path.rstrip("/") + "/"):
            raise self._outside(ref)
        return candidate

    def _resolve_local(self, ref: str) -> str:
        path = Path(ref) if os.path.isabs(ref) else Path(self.path) / ref
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as exc:  # Python 3.11 reports a link loop as RuntimeError, later ones as ELOOP
            loop = isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP
            reason = "a symbolic link loop" if loop else exc.strerror or str(exc)
            raise RecordError(
                f"image path {ref!r} cannot be resolved ({reason})", "image_path_invalid", detail={"image": ref}
            ) from None
        assert self.real_root is not None
        if not real.is_relative_to(self.real_root):
            link = self._link_in_root(path)
            raise self._outside(ref, f"it goes through the symbolic link {link!r} to {real}" if link else "")
        return str(real)

    def _link_in_root(self, path: Path) -> str | None:
        """The first symbolic link (relative to the root) on ``path``'s way down from the root, if any."""
        base, lexical = Path(os.path.abspath(self.path)), Path(os.path.abspath(path))
        if not lexical.is_relative_to(base):
            return None
        current = base
        for part in lexical.relative_to(base).parts:
            current = current / part
            if current.is_symlink():
                return str(current.relative_to(base))
        return None

    def _outside(self, ref: str, how: str = "") -> RecordError:
        return RecordError(
            f"image path {ref!r} leaves the dataset root {self.root}{': ' + how if how else ''}; "
            "pass --image-root with a folder that holds it",
            "image_outside_root",
            detail={"image": ref},
        )

    @staticmethod
    def names_file(ref: str) -> bool:
        """Whether ``ref`` names a file (under the root), rather than holding the image or being a URL."""
        return not isinstance(ref, InlineImage) and not ref.startswith(("data:", "http://", "https://"))

    def read(self, ref: str) -> bytes:
        """The bytes of the image ``ref`` names; every failure is a :class:`RecordError` naming it."""
        if isinstance(ref, InlineImage):
            label = str(ref)
            _check_size(len(ref.data), label, self.max_image_bytes)
            if not ref.data:
                raise RecordError(f"{label} is empty (0 bytes)", "image_empty", detail={"image": label})
            return ref.data
        if ref.startswith("data:"):
            return _data_uri_bytes(ref, self.max_image_bytes)
        if ref.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise RecordError(
                    f"remote image {ref!r} not fetched: pass --allow-remote to download images",
                    "image_remote",
                    detail={"image": ref},
                )
            cap = min(self.max_bytes, self.max_image_bytes)
            return fetch(ref, timeout=self.timeout, max_bytes=cap, retries=self.retries)
        path = self.resolve(ref)
        data = read_regular_file(path, ref, self.max_image_bytes) if self.local else self._read_fs(path, ref)
        if not data:
            raise RecordError(f"image file is empty (0 bytes): {ref}", "image_empty", detail={"image": ref})
        return data

    def _read_fs(self, path: str, ref: str) -> bytes:
        """A file of an fsspec root: its listed type and size checked first."""
        fs = self.fs
        try:
            info = fs.info(path)
            if info.get("type") != "file":
                kind = "a folder" if info.get("type") == "directory" else f"a {info.get('type')}"
                raise _not_a_file(ref, kind)
            _check_size(info.get("size") or 0, ref, self.max_image_bytes)
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise RecordError(f"image not found: {ref}", "image_missing", detail={"image": ref}) from None
        except OSError as exc:
            raise _unreadable(ref, exc) from None
        _check_size(len(data), ref, self.max_image_bytes)
        return data


def read_regular_file(path: str, ref: str, max_bytes: int) -> bytes:
    """The bytes of the local regular file ``path``; anything else, or a file over ``max_bytes``, is refused unread."""
    try:
        _check_file(os.stat(path), ref, max_bytes)  # a FIFO or a device is never even opened
        # Checked again on what was opened: O_NONBLOCK keeps a FIFO swapped in meanwhile from blocking the open,
        # O_NOFOLLOW refuses a symbolic link swapped in after the path was resolved.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
        with open(os.open(path, flags), "rb") as file:
            info = os.fstat(file.fileno())
            _check_file(info, ref, max_bytes)
            return file.read(info.st_size)
    except FileNotFoundError:
        raise RecordError(f"image not found: {ref}", "image_missing", detail={"image": ref}) from None
    except OSError as exc:
        raise _unreadable(ref, exc) from None


def _check_file(info: os.stat_result, ref: str, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "a special file")
        raise _not_a_file(ref, kind)
    _check_size(info.st_size, ref, max_bytes)


def _check_size(size: int, ref: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise RecordError(
            f"image file is {size} bytes, over --max-image-bytes {max_bytes}: {ref}",
            "image_too_large",
            detail={"image": ref},
        )


def _not_a_file(ref: str, kind: str) -> RecordError:
    return RecordError(f"image path is {kind}, not a regular file: {ref}", "image_not_file", detail={"image": ref})


def _unreadable(ref: str, exc: OSError) -> RecordError:
    reason = exc.strerror or str(exc)
    return RecordError(f"image cannot be read: {ref} ({reason})", "image_unreadable", detail={"image": ref})


def image_label(ref: str) -> str:
    """How a sample records where an image came from (inline data is not copied into the metadata)."""
    if ref.startswith("data:"):
        return f"inline image ({len(ref)} characters of data URI)"
    return str(ref)  # an InlineImage's label, without its bytes


def _data_uri_bytes(ref: str, max_bytes: int) -> bytes:
    header, _, payload = ref.partition(",")
    detail = {"image": ref[:48] + "..."}
    if not header.endswith(";base64"):
        raise RecordError("inline image: only base64 data: URIs are supported", "image_corrupt", detail=detail)
    size = len(payload) // 4 * 3 - payload[-2:].count("=")  # its decoded size, known before decoding
    if size > max_bytes:
        raise RecordError(
            f"inline image is {size} bytes, over --max-image-bytes {max_bytes}", "image_too_large", detail=detail
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError("inline image: the data: URI is not valid base64", "image_corrupt", detail=detail) from None
    if not data:
        raise RecordError("inline image is empty", "image_empty", detail=detail)
    return data


def fetch(url: str, *, timeout: float, max_bytes: int, retries: int) -> bytes:
    """Download ``url`` in at most ``timeout`` seconds in all and ``max_bytes``, retrying transient failures.

    The deadline bounds the whole download, not each read: a server that
    sends a byte a second is cut off at it.
    """
    detail = {"image": url}
    deadline = time.monotonic() + timeout
    for attempt in range(retries + 1):
        try:
            return _download(url, deadline, max_bytes)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:  # the server's answer will not change
                raise RecordError(
                    f"remote image not fetched (HTTP {exc.code}): {url}", "image_missing", detail=detail
                ) from None
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # timeouts, resets, TLS
            reason = str(getattr(exc, "reason", exc))
        except RecordError:
            raise
        except ValueError as exc:  # a URL urllib cannot even send, or a malformed Content-Length
            raise RecordError(
                f"remote image URL cannot be fetched ({exc}): {url}", "image_remote", detail=detail
            ) from None
        if time.monotonic() >= deadline:
            raise RecordError(
                f"remote image not fetched within {timeout:g} s (--remote-timeout, the whole download; "
                f"{attempt + 1} tries, last: {reason}): {url}",
                "image_timeout",
                detail=detail,
            )
        if attempt < retries:
            time.sleep(min(0.2 * 2**attempt, deadline - time.monotonic()))
    raise RecordError(
        f"remote image not fetched after {retries + 1} tries ({reason}): {url}", "image_unreadable", detail=detail
    )


def _download(url: str, deadline: float, max_bytes: int) -> bytes:
    """One try at ``url``, every socket wait bounded by the time left before ``deadline``."""
    detail = {"image": url}
    request = urllib.request.Request(url, headers={"User-Agent": "shardkit"})
    with urllib.request.urlopen(request, timeout=_time_left(deadline)) as response:
        declared = response.headers.get("Content-Length")
        if declared and int(declared) > max_bytes:
            raise RecordError(
                f"remote image is {int(declared)} bytes, over {max_bytes}: {url}", "image_too_large", detail=detail
            )
        chunks, size = [], 0
        while chunk := _read_some(response, deadline):
            size += len(chunk)
            if size > max_bytes:
                raise RecordError(f"remote image is over {max_bytes} bytes: {url}", "image_too_large", detail=detail)
            chunks.append(chunk)
    if not size:
        raise RecordError(f"remote image is empty: {url}", "image_empty", detail=detail)
    return b"".join(chunks)


def _read_some(response: http.client.HTTPResponse, deadline: float) -> bytes:
    """What the server has sent so far (one socket read), waiting no longer than the deadline."""
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)  # http.client keeps no public handle on it
    if sock is not None:
        sock.settimeout(_time_left(deadline))
    elif time.monotonic() >= deadline:  # each read then waits at most the timeout urlopen was given
        raise TimeoutError("timed out")
    return response.read1(1 << 16)


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left
