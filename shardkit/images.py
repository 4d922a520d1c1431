"""Images: resolve safely, open, orient, convert to RGB, resize to the family's grid, encode.

The stored image is already on the grid the model's image processor would pick
(sides multiples of ``patch_size * merge_size``, pixels within its bounds), so
that processor leaves it as it is and the recorded grid and token count are
exactly what the trainer sees.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import math
import os
import posixpath
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shardkit.errors import ConfigError, RecordError
from shardkit.storage import is_local, open_fs

MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses anything longer
# shardkit checks every image's declared size against --max-image-pixels itself, from the header, before
# decoding it; Pillow's own, fixed guard (about 179 MP) would make a larger limit impossible.
Image.MAX_IMAGE_PIXELS = None
ORIENTATION_TAG = 0x0112


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
    is refused. ``data:`` URIs carry the image itself (base64). ``http(s)``
    URLs are fetched only with ``allow_remote``, with a timeout, a size limit
    and retries.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        allow_remote: bool = False,
        timeout: float = 10.0,
        max_bytes: int = 50_000_000,
        retries: int = 3,
    ):
        self.root = str(root)
        fs, self.path = open_fs(self.root)
        self.local = is_local(fs)
        self.real_root = Path(self.path).resolve() if self.local else None
        self.allow_remote, self.timeout, self.max_bytes, self.retries = allow_remote, timeout, max_bytes, retries

    @property
    def fs(self) -> Any:
        """The root's filesystem, made in this process (fsspec caches it per process: forked workers get their own)."""
        return open_fs(self.root)[0]

    def resolve(self, ref: str) -> str:
        """The file a path names; :class:`RecordError` when it leaves the root."""
        outside = RecordError(
            f"image path {ref!r} leaves the dataset root", "image_outside_root", detail={"image": ref}
        )
        if self.local:
            path = Path(ref) if os.path.isabs(ref) else Path(self.path) / ref
            real = path.resolve()
            if not real.is_relative_to(self.real_root):
                raise outside
            return str(real)
        if "://" in ref:
            ref_fs, ref_path = open_fs(ref)
            if type(ref_fs) is not type(self.fs):
                raise outside
            candidate = posixpath.normpath(ref_path)
        elif ref.startswith("/"):
            raise outside
        else:
            candidate = posixpath.normpath(posixpath.join(self.path, ref))
        if not candidate.startswith(self.path.rstrip("/") + "/"):
            raise outside
        return candidate

    def read(self, ref: str) -> bytes:
        """The bytes of the image ``ref`` names; every failure is a :class:`RecordError` naming it."""
        if ref.startswith("data:"):
            return _data_uri_bytes(ref)
        if ref.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise RecordError(
                    f"remote image {ref!r} not fetched: pass --allow-remote to download images",
                    "image_remote",
                    detail={"image": ref},
                )
            return fetch(ref, timeout=self.timeout, max_bytes=self.max_bytes, retries=self.retries)
        path = self.resolve(ref)
        detail = {"image": ref}
        try:
            data = Path(path).read_bytes() if self.local else self.fs.cat_file(path)
        except FileNotFoundError:
            raise RecordError(f"image not found: {ref}", "image_missing", detail=detail) from None
        except IsADirectoryError:
            raise RecordError(f"image path is a folder: {ref}", "image_missing", detail=detail) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise RecordError(f"image cannot be read: {ref} ({reason})", "image_unreadable", detail=detail) from None
        if not data:
            raise RecordError(f"image file is empty (0 bytes): {ref}", "image_empty", detail=detail)
        return data


def describe(ref: str) -> str:
    """How a sample records where an image came from (inline data is not copied into the metadata)."""
    if ref.startswith("data:"):
        return f"inline image ({len(ref)} characters of data URI)"
    return ref


def _data_uri_bytes(ref: str) -> bytes:
    header, _, payload = ref.partition(",")
    detail = {"image": ref[:48] + "..."}
    if not header.endswith(";base64"):
        raise RecordError("inline image: only base64 data: URIs are supported", "image_corrupt", detail=detail)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError("inline image: the data: URI is not valid base64", "image_corrupt", detail=detail) from None
    if not data:
        raise RecordError("inline image is empty", "image_empty", detail=detail)
    return data


def fetch(url: str, *, timeout: float, max_bytes: int, retries: int) -> bytes:
    """Download ``url`` with a timeout and a size limit; retry transient failures with backoff."""
    detail = {"image": url}
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "shardkit"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared and int(declared) > max_bytes:
                    raise RecordError(
                        f"remote image is {int(declared)} bytes, over {max_bytes}: {url}",
                        "image_too_large",
                        detail=detail,
                    )
                data = response.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise RecordError(f"remote image is over {max_bytes} bytes: {url}", "image_too_large", detail=detail)
            if not data:
                raise RecordError(f"remote image is empty: {url}", "image_empty", detail=detail)
            return data
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
        if attempt < retries:
            time.sleep(0.2 * 2**attempt)
    raise RecordError(
        f"remote image not fetched after {retries + 1} tries ({reason}): {url}", "image_unreadable", detail=detail
    )


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
            self.image = Image.open(io.BytesIO(data))
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
        try:
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
        return to_rgb(image)


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
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image, dtype=np.float64)
        if mode != "I" or array.max(initial=0) > 255:
            array = array / 257.0  # 16-bit range to 8-bit
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        array = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255)
        return Image.fromarray(array.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    """Resize to ``size`` (height, width) with bicubic resampling, as the processor would, and encode JPEG."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
