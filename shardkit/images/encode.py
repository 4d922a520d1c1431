"""The stored form of an image: resized onto its grid size and encoded as JPEG."""

from __future__ import annotations

import io

from PIL import Image


def encode_jpeg(image: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    """Resize to ``size`` (height, width) with bicubic resampling, as the processor would, and encode JPEG."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
