"""Images: resolve safely, open, orient, convert to RGB, resize to the family's grid, encode."""

from shardkit.images.decode import (
    DEFAULT_MAX_IMAGE_BYTES,
    MAX_ASPECT_RATIO,
    Grid,
    ImageRoot,
    SourceImage,
    decode_image,
    describe,
    encode_jpeg,
    fetch,
    read_regular_file,
    smart_resize,
    to_rgb,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "MAX_ASPECT_RATIO",
    "Grid",
    "ImageRoot",
    "SourceImage",
    "decode_image",
    "describe",
    "encode_jpeg",
    "fetch",
    "read_regular_file",
    "smart_resize",
    "to_rgb",
]
