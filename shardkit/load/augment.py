"""Load-time image augmentation: random rotation, brightness and contrast, the same wherever it runs.

An image's changes are drawn from a generator seeded by ``(seed, epoch, sample
key, image index)`` alone, so a sample gets the same changes in the same epoch
whatever the worker, batch, rank or resume, and other changes in another epoch.
The image keeps its size (rotation does not expand it; uncovered corners get
the fill colour), so its grid and token count stay those of the build.

Rotation moves pixels under a sample's grounding boxes, whose coordinates are
written in its tokens: it is refused for builds and samples with boxes
(:meth:`Augment.check_boxes`); brightness and contrast leave them where they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from shardkit.errors import ConfigError


@dataclass(frozen=True)
class Augment:
    """Random changes to each image, each drawn uniformly.

    ``rotation``: degrees, within ``[-rotation, rotation]``; ``brightness`` and
    ``contrast``: factors within ``[1 - x, 1 + x]``; ``probability``: the
    chance that an image is changed at all; ``seed``: picks another set of
    changes.
    """

    rotation: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    probability: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rotation < 0 or not 0 <= self.brightness < 1 or not 0 <= self.contrast < 1:
            raise ConfigError("augment: rotation must be >= 0, brightness and contrast within [0, 1)")
        if not 0 <= self.probability <= 1:
            raise ConfigError(f"augment: probability must be within [0, 1], got {self.probability}")
        if self.seed < 0:
            raise ConfigError(f"augment: seed must be >= 0, got {self.seed}")

    def check_boxes(self, boxes: int, where: str) -> None:
        """:class:`ConfigError` when this augmentation rotates and ``where`` (a build, a sample) holds ``boxes``
        grounding boxes or points."""
        if self.rotation > 0 and boxes:
            raise ConfigError(
                f"augment: {where} carries {boxes} grounding boxes or points, whose coordinates are written in its "
                f"tokens; rotation ({self.rotation:g} degrees) would move the pixels under them. Set rotation=0 "
                "(brightness and contrast are fine)"
            )

    def generator(self, epoch: int, key: str, index: int) -> np.random.Generator:
        """The random generator of image ``index`` of sample ``key`` in ``epoch``."""
        key_hash = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return np.random.default_rng([self.seed, epoch, key_hash, index])

    def __call__(
        self, image: Image.Image, *, epoch: int, key: str, index: int, fill: tuple[int, int, int]
    ) -> Image.Image:
        """``image`` (RGB) changed as drawn for this epoch, sample and image; same size."""
        rng = self.generator(epoch, key, index)
        apply, angle, brightness, contrast = rng.random(4)
        if apply >= self.probability:
            return image
        image = image.rotate(
            (2 * angle - 1) * self.rotation, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill
        )
        image = ImageEnhance.Brightness(image).enhance(1 + (2 * brightness - 1) * self.brightness)
        return ImageEnhance.Contrast(image).enhance(1 + (2 * contrast - 1) * self.contrast)
