"""An image's bytes to an upright 8-bit sRGB picture: checked from its header, then decoded.

The decompression-bomb guard is the caller's ``max_pixels``, applied to each
image; Pillow's process-wide ``MAX_IMAGE_PIXELS`` is left as the process set it.
"""

from __future__ import annotations

import functools
import io
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from shardkit.errors import RecordError
from shardkit.images.grid import MAX_ASPECT_RATIO

ORIENTATION_TAG = 0x0112
_PILLOW_GUARD = threading.Lock()


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
        self.ref = ref = str(ref)  # an InlineImage's label, not its bytes again
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
    return ImageCms.buildTransform(_icc_profile(icc), ImageCms.createProfile("sRGB"), mode, "RGB")
