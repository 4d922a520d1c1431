"""Images, in the order a build handles them.

:mod:`~shardkit.images.sources` reads an image's bytes (files inside the
dataset root, inline data, opt-in URLs); :mod:`~shardkit.images.decode` opens
them safely into an upright sRGB picture; :mod:`~shardkit.images.grid` picks
its size on the model family's grid; :mod:`~shardkit.images.encode` stores it
as JPEG.
"""

from shardkit.images.decode import SourceImage, decode_image, to_rgb
from shardkit.images.encode import encode_jpeg
from shardkit.images.grid import MAX_ASPECT_RATIO, Grid, smart_resize
from shardkit.images.sources import DEFAULT_MAX_IMAGE_BYTES, ImageRoot, fetch, image_label, read_regular_file

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "MAX_ASPECT_RATIO",
    "Grid",
    "ImageRoot",
    "SourceImage",
    "decode_image",
    "encode_jpeg",
    "fetch",
    "image_label",
    "read_regular_file",
    "smart_resize",
    "to_rgb",
]
