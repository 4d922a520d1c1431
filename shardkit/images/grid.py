"""The image grid: the size Qwen's image processor resizes an image to, and sizes that fit a token budget.

The stored image is already on the grid the model's image processor would pick
(sides multiples of ``patch_size * merge_size``, pixels within its bounds), so
that processor leaves it as it is and the recorded grid and token count are
exactly what the trainer sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shardkit.errors import ConfigError, RecordError

MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses anything longer


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
