"""Images: resolve safely, open, orient, convert to RGB, resize to the family's grid, encode.

The stored image is already on the grid the model's image processor would pick
(sides multiples of ``patch_size * merge_size``, pixels within its bounds), so
that processor leaves it as it is and the recorded grid and token count are
exactly what the trainer sees.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import http.client
import io
import math
import os
import posixpath
import stat
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from shardkit.errors import ConfigError, RecordError
from shardkit.storage import is_local, open_fs

MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses anything longer
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024  # --max-image-bytes: the largest image file read
ORIENTATION_TAG = 0x0112
_SRGB = ImageCms.createProfile("sRGB")
_PILLOW_GUARD = threading.Lock()
_FILE_KINDS = [
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen's image processor resizes ``height x width`` to (same rule as transformers')."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is over {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Grid:
    """The image grid of a model family with the build's pixel bounds."""

    factor: int
    min_pixels: int
    max_pixels: int

    def __post_init__(self) -> None:
        if self.min_pixels < 1 or self.max_pixels < 1:
            raise ConfigError("min_pixels and max_pixels must be positive")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.max_pixels < self.factor * self.factor:
            raise ConfigError(
                f"max_pixels ({self.max_pixels}) is below one grid cell "
                f"({self.factor}x{self.factor} = {self.factor**2})"
            )

    def size(self, height: int, width: int, cap: int | None = None) -> tuple[int, int]:
        """Grid size for an image, at most ``cap`` pixels where possible, stable under the processor.

        Stable means the processor, run with this grid's bounds on an image of
        the returned size, returns the same size: sides are multiples of the
        factor and the area lies within the bounds. ``smart_resize`` alone can
        land just outside them (its floor can undershoot ``min_pixels``; a side
        clamped to one cell can overshoot ``max_pixels``), so the size is then
        moved by whole cells, keeping the aspect ratio as close as it can.
        """
        f, lo, hi = self.factor, self.min_pixels, self.max_pixels
        try:
            h, w = smart_resize(height, width, f, lo, min(cap or hi, hi))
        except ValueError as exc:
            raise RecordError(
                f"image {width}x{height}: {exc}, which Qwen's image processor refuses", "image_aspect"
            ) from None
        aspect = height / width
        while h * w < lo:
            if h / w < aspect:
                h += f
            else:
                w += f
        while h * w > hi and (h > f or w > f):
            if (h / w > aspect and h > f) or w == f:
                h -= f
            else:
                w -= f
        if smart_resize(h, w, f, lo, hi) != (h, w):
            raise RecordError(
                f"image {width}x{height} has no size on the {f}-pixel grid between min_pixels {lo} and max_pixels {hi}",
                "image_aspect",
            )
        return h, w

    def tokens(self, height: int, width: int) -> int:
        """Merged tokens of an image already on the grid."""
        return (height // self.factor) * (width // self.factor)

    def plan(self, sizes: Sequence[tuple[int, int]], budget: int | None = None) -> list[tuple[int, int]] | None:
        """Grid sizes for a sample's images whose tokens sum to at most ``budget``.

        Without a budget, every image gets its full size. Otherwise one pixel cap,
        shared by the sample's images, is lowered (by bisection) until the tokens
        fit, so the largest images shrink first; None when even the minimum size
        does not fit.
        """

        def at(cap: int) -> list[tuple[int, int]]:
            return [self.size(h, w, cap) for h, w in sizes]

        def cost(planned: list[tuple[int, int]]) -> int:
            return sum(self.tokens(h, w) for h, w in planned)

        best = at(self.max_pixels)
        if budget is None or cost(best) <= budget:
            return best
        lo, hi = self.min_pixels, self.max_pixels  # cost(at(hi)) > budget
        if cost(at(lo)) > budget:
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost(at(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        return at(lo)


class ImageRoot:
    """Reads the images a record names: files inside the dataset root, inline data, or (opt-in) URLs.

    The root is a local folder or an fsspec URL (``s3://bucket/data``). A path
    is relative to the root (or, locally, an absolute path inside it); anything
    that leaves the root, through ``..``, an absolute path or a symbolic link,
    is refused. Only regular files are read (never a FIFO, a device or a
    folder), and none larger than ``max_image_bytes``, checked before reading.
    ``data:`` URIs carry the image itself (base64). ``http(s)`` URLs are
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

    def read(self, ref: str) -> bytes:
        """The bytes of the image ``ref`` names; every failure is a :class:`RecordError` naming it."""
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


def describe(ref: str) -> str:
    """How a sample records where an image came from (inline data is not copied into the metadata)."""
    if ref.startswith("data:"):
        return f"inline image ({len(ref)} characters of data URI)"
    return ref


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


class SourceImage:
    """An image opened and checked from its header alone: size, orientation, no pixels decoded yet.

    Construction raises :class:`RecordError` for what the header already
    shows: not an image, a corrupt header, a decompression bomb
    (``max_pixels``), an aspect ratio Qwen refuses. :meth:`decode` then
    decodes, reducing a JPEG in the DCT domain when a much smaller size is
    wanted (as Pillow's ``thumbnail`` does), which saves most of the decoding
    of large photos.
    """

    def __init__(self, data: bytes, ref: str, *, max_pixels: int):
        self.ref = ref
        detail = {"image": ref}
        if not data:
            raise RecordError(f"image file is empty (0 bytes): {ref}", "image_empty", detail=detail)
        try:
            self.image = _open_lazily(data)
            width, height = self.image.size
        except UnidentifiedImageError:
            raise RecordError(f"not an image (unrecognised format): {ref}", "image_not_image", detail=detail) from None
        except Exception as exc:  # Pillow raises many types on malformed headers
            raise RecordError(f"image header is corrupt: {ref} ({exc})", "image_corrupt", detail=detail) from None
        if width * height > max_pixels:
            raise RecordError(
                f"image declares {width}x{height} = {width * height / 1e6:.0f} megapixels, over the limit of "
                f"{max_pixels / 1e6:.0f} (decompression-bomb guard; raise --max-image-pixels if it is real): {ref}",
                "image_too_large",
                detail=detail,
            )
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise RecordError(
                f"image is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO}:1, which Qwen's image "
                f"processor refuses: {ref}",
                "image_aspect",
                detail=detail,
            )
        try:
            self.orientation = _orientation(self.image)
        except Exception as exc:
            raise RecordError(f"image metadata is corrupt: {ref} ({exc})", "image_corrupt", detail=detail) from None
        self.transposed = self.orientation in (5, 6, 7, 8)  # EXIF rotations by 90 or 270 degrees
        self.height, self.width = (width, height) if self.transposed else (height, width)

    def decode(self, size: tuple[int, int] | None = None) -> Image.Image:
        """The oriented RGB picture; with ``size`` (height, width) it may come out smaller, never below ``size``."""
        image = self.image
        # Pillow checks some formats' sizes again while decoding (GIF frames, TIFF tiles): this image passed ours
        lifted = self.width * self.height > 2 * (Image.MAX_IMAGE_PIXELS or math.inf)
        try:
            with _pillow_guard(self.width * self.height) if lifted else nullcontext(), warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if size is not None and image.format == "JPEG":
                    height, width = size
                    image.draft("RGB", (height, width) if self.transposed else (width, height))
                image.load()
            if self.orientation != 1:  # exif_transpose copies even an upright image
                image = ImageOps.exif_transpose(image)
        except Exception as exc:  # truncated data: OSError; broken streams: SyntaxError, ValueError...
            raise RecordError(
                f"image is truncated or corrupt: {self.ref} ({exc})", "image_corrupt", detail={"image": self.ref}
            ) from None
        try:
            return to_rgb(image)
        except (ImageCms.PyCMSError, ValueError) as exc:
            raise RecordError(
                f"image colours cannot be converted to sRGB: {self.ref} ({exc})",
                "image_colour",
                detail={"image": self.ref},
            ) from None


def _open_lazily(data: bytes) -> Image.Image:
    """The image, its header read and nothing decoded; shardkit's own size check follows.

    Pillow's process-wide bomb guard stays as it is; only when it refuses an
    image is the header read again without it (under a lock, for that one
    header), so that the caller's limit decides and can name the size.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            with _pillow_guard(None):
                return Image.open(io.BytesIO(data))


@contextmanager
def _pillow_guard(pixels: int | None) -> Iterator[None]:
    """Pillow's bomb guard set to ``pixels`` (None: off) for the block, then restored; one block at a time."""
    with _PILLOW_GUARD:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright), read without decoding pixels."""
    if image.format == "PNG":  # Pillow's getexif() decodes a PNG to look for EXIF after its pixel data
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(ORIENTATION_TAG, 1)
    return image.getexif().get(ORIENTATION_TAG, 1)


def decode_image(data: bytes, ref: str, *, max_pixels: int) -> Image.Image:
    """Open, check, fully decode, apply EXIF orientation and convert to RGB (:class:`RecordError` naming ``ref``)."""
    return SourceImage(data, ref, max_pixels=max_pixels).decode()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit sRGB: colour profile applied, samples scaled to 8 bits, transparency on white.

    An embedded ICC profile is converted to sRGB with LittleCMS (an sRGB
    profile is taken as it is); :class:`ImageCms.PyCMSError` or
    :class:`ValueError` when it cannot be. Samples wider than 8 bits are
    scaled by one rule: unsigned 16-bit (``I;16``) by 255/65535; 32-bit
    integers (``I``) as they are when within 0-255, by 255/65535 when within
    0-65535, else stretched from their minimum to their maximum; floats
    (``F``) by 255 when within 0-1, else stretched likewise (NaN and
    infinities become 0).
    """
    icc = image.info.get("icc_profile")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_eight_bits(image)
    if icc:
        image = _to_srgb(image, icc)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as 8-bit grey, by :func:`to_rgb`'s rule."""
    array = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        array = np.where(np.isfinite(array), array, 0)
    low, high = float(array.min(initial=0)), float(array.max(initial=0))
    if image.mode == "F" and low >= 0 and high <= 1:
        array = array * 255
    elif image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        array = array / 257  # 65535 / 255
    elif low < 0 or high > 255 or image.mode == "F":
        array = (array - low) * (255 / (high - low)) if high > low else np.zeros_like(array)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


_PROFILE_SPACES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}
_MODE_SPACES = {"L": "GRAY", "LA": "GRAY", "La": "GRAY", "1": "GRAY", "CMYK": "CMYK"}


def _to_srgb(image: Image.Image, icc: bytes) -> Image.Image:
    """The image converted from its embedded ICC profile to sRGB (RGB, or RGBA when it has transparency)."""
    profile = _icc_profile(icc)
    space = profile.profile.xcolor_space.strip()
    if space == "RGB" and profile.profile.profile_description.startswith("sRGB"):
        return image
    if space not in _PROFILE_SPACES:
        raise ValueError(f"its ICC profile is for {space} data")
    if _MODE_SPACES.get(image.mode, "RGB") != space:
        raise ValueError(f"its ICC profile is for {space} data, its pixels are {image.mode}")
    alpha = None
    if "A" in image.getbands() or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
    base = image.convert(_PROFILE_SPACES[space])
    converted = ImageCms.applyTransform(base, _srgb_transform(icc, base.mode))
    assert converted is not None
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


@functools.lru_cache(maxsize=8)
def _icc_profile(icc: bytes) -> ImageCms.ImageCmsProfile:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except OSError as exc:
        raise ValueError(f"its ICC profile cannot be read: {exc}") from None


@functools.lru_cache(maxsize=8)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(_icc_profile(icc), _SRGB, mode, "RGB")


def encode_jpeg(image: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    """Resize to ``size`` (height, width) with bicubic resampling, as the processor would, and encode JPEG."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
