"""Frozen configuration of a build.

Everything that changes the bytes of the output lives in :class:`BuildConfig`
and is recorded in the manifest; how the build runs (workers, progress,
strictness) is passed to :func:`shardkit.build.build` separately.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shardkit.errors import ConfigError
from shardkit.images import DEFAULT_MAX_IMAGE_BYTES, Grid
from shardkit.render import Family, TrainOn, get_family
from shardkit.schema import format_validation_error


class ShardFormat(StrEnum):
    """Shard file format."""

    TAR = "tar"
    PARQUET = "parquet"


class Overlength(StrEnum):
    """What to do with a sample longer than ``max_length``."""

    FIT = "fit"
    """Lower the sample's image resolution (down to min_pixels, on the grid) until it fits."""
    DROP = "drop"
    """Reject the sample with a reason."""
    TRUNCATE = "truncate"
    """Cut trailing text; never image tokens (rejected if the cut would reach an image)."""


class Options(BaseModel):
    """Base of shardkit's option sets: frozen, unknown keys refused, errors as one plain :class:`ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def create(cls, **options: Any) -> Self:
        """Like the constructor, with option errors as one :class:`ConfigError`."""
        try:
            return cls(**options)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None


class BuildConfig(Options):
    """What to build and how; ``min_pixels``/``max_pixels`` default to the family's processor."""

    input: str
    out: str
    image_root: str | None = None
    input_format: str = "auto"
    prompt: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    text_column: str | None = None
    question_column: str | None = None
    keep_keys: tuple[str, ...] = ()
    allow_remote: bool = False
    remote_timeout: float = Field(10.0, gt=0)
    remote_max_bytes: int = Field(50_000_000, ge=1)
    val_fraction: float | None = Field(None, gt=0, lt=1)
    split: Literal["train", "val"] | None = None
    dedup: bool = False
    format: ShardFormat = ShardFormat.TAR
    model: str = "qwen2_vl"
    tokenizer: str | None = None
    max_length: int = Field(2048, ge=32)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    max_image_pixels: int = Field(100_000_000, ge=1)
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1)
    train_on: TrainOn = TrainOn.LAST_ASSISTANT
    overlength: Overlength = Overlength.FIT
    samples_per_shard: int = Field(1000, ge=1)
    max_shard_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    jpeg_quality: int = Field(90, ge=1, le=100)

    @model_validator(mode="after")
    def _check(self) -> BuildConfig:
        if (self.split is None) != (self.val_fraction is None):
            raise ValueError("a train/validation split needs both split and val_fraction")
        family = get_family(self.model)
        object.__setattr__(self, "min_pixels", self.min_pixels or family.min_pixels)
        object.__setattr__(self, "max_pixels", self.max_pixels or family.max_pixels)
        Grid(family.factor, self.min_pixels, self.max_pixels)  # raises on bad bounds
        return self

    @property
    def family(self) -> Family:
        return get_family(self.model)

    @property
    def grid(self) -> Grid:
        return Grid(self.family.factor, int(self.min_pixels or 0), int(self.max_pixels or 0))

    def input_options(self) -> dict[str, Any]:
        """Options of the input form (prompt and columns)."""
        return {
            "prompt": self.prompt,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "text_column": self.text_column,
            "question_column": self.question_column,
            "keep_keys": self.keep_keys,
        }

    def identity(self) -> dict[str, Any]:
        """The options that decide the output's bytes (the output location excluded)."""
        return self.model_dump(mode="json", exclude={"out", "input", "image_root"})
