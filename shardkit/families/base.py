"""What a model family is: every fact shardkit uses about one model generation, in one frozen record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shardkit.boxes import Style
from shardkit.render import ChatTokens, Renderer
from shardkit.tokenizer import DEFAULT_TOKENIZER
from shardkit.video import VideoGrid


@dataclass(frozen=True, kw_only=True)
class Family:
    """A model family: its chat format and tokens, its tokenizer, its image grid and normalisation, its
    transformers classes, what it can take and which Tinker renderer it equals.

    Only the name and the grid enter a build's manifest (:meth:`manifest_entry`); the other fields may grow
    without moving a build's bytes.
    """

    name: str

    # the chat format and the tokenizer
    chat_format: type[Renderer]
    """Renders a record in this family's chat format (made with :meth:`renderer`)."""
    tokens: ChatTokens
    """The special tokens, as text; their ids are the tokenizer's (:attr:`Renderer.ids`)."""
    tokenizer: str = DEFAULT_TOKENIZER
    """The tokenizer used when a build names none (offline, bundled)."""
    last_added_id: int | None
    """The model's last added-token id: the tokenizer's later added tokens are read as plain text (None: keep all)."""

    # the image grid and normalisation of its processor
    patch_size: int
    merge_size: int
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int

    # transformers
    model_classes: Mapping[str, str] = field(hash=False)
    """transformers ``model_type`` -> its ``...ForConditionalGeneration`` class name, for the checkpoints this
    family's builds train."""
    processor_class: str
    image_processor_class: str

    # what it can take
    images: bool = True
    video_grid: VideoGrid | None = None
    """How its video processor samples and sizes a clip, at the processor's defaults (None: it takes no video)."""
    boxes: bool = False
    box_style: Style | None = None
    """How the family writes a box or point in text by default (:data:`shardkit.boxes.STYLES`): its coordinate scale
    (absolute pixels of the stored image, or 0-1000) and syntax; None when it takes no boxes (``boxes=False``)."""

    tinker_renderer: str | None = None
    """The tinker-cookbook renderer whose tokens this family's equal (None: none; Tinker does not train it)."""

    def __post_init__(self) -> None:
        if self.boxes != (self.box_style is not None):
            raise ValueError(f"family {self.name}: boxes={self.boxes} needs a box_style exactly when it takes boxes")
        grid = self.video_grid
        if grid is not None and (grid.patch_size, grid.merge_size, grid.temporal_patch_size) != (
            self.patch_size,
            self.merge_size,
            self.temporal_patch_size,
        ):
            raise ValueError(f"family {self.name}: its video grid's patches differ from its images'")

    @property
    def video(self) -> bool:
        """Whether the family takes videos."""
        return self.video_grid is not None

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    def renderer(self, tokenizer: Any) -> Renderer:
        """The chat format's renderer over ``tokenizer``, with this family's tokens and vocabulary bound."""
        return self.chat_format(tokenizer, self.tokens, self.last_added_id)

    def manifest_entry(self) -> dict[str, Any]:
        """The family as a build's manifest records it (its name and image processor settings)."""
        return {
            "name": self.name,
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
