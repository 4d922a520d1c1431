"""The manifest: the build's table of contents, written last.

``DIR/manifest.json`` lists every shard with its sample count, size and sha256,
the totals, and what produced it (:class:`BuildInfo`: model family, tokenizer name
and fingerprint, special token ids, pixel bounds, max_length, train_on, ...). Its presence means the
build is complete. Every path in it is a plain file name inside the build
folder (no ``..``, no ``/``, not absolute), and :func:`family_problems` checks
its family's constants against the family it names (the loader's
``manifest_problems`` checks the rest).
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from shardkit.errors import ShardError, ShardMissingError
from shardkit.shards.files import reading_error
from shardkit.storage import join, open_fs, write_bytes

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: the manifest's fields written only where they hold something (not 0, not None): builds without boxes or videos
#: keep the bytes they had before those were counted
WHEN_SET = ("num_boxes", "num_points", "num_text_boxes", "num_videos", "num_video_frames", "video")


def _in_build_folder(path: str) -> str:
    if not _FILE_NAME.fullmatch(path) or path in (".", ".."):
        raise ValueError(f"path {path!r} is not a file name in the build folder")
    return path


M = TypeVar("M", bound=BaseModel)


class StoredFile(BaseModel):
    """A file of the build folder as the manifest records it: its path there, size and sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    _path = field_validator("path")(_in_build_folder)


class ShardEntry(StoredFile):
    """One shard file."""

    num_samples: int = Field(ge=0)
    num_tokens: int = Field(ge=0)


class IndexFile(StoredFile):
    """The per-sample index file (see :mod:`shardkit.shards.index`)."""

    num_rows: int = Field(ge=0)


class FamilyInfo(BaseModel):
    """The model family a build was made for: its name and the image grid and normalisation of its processor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    patch_size: int = Field(ge=1)
    merge_size: int = Field(ge=1)
    temporal_patch_size: int = Field(ge=1)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


class SpecialTokens(BaseModel):
    """The token ids of the build's vision markers and padding (``pad``: None when the tokenizer has none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image_pad: int
    vision_start: int
    vision_end: int
    pad: int | None


class BuildInfo(BaseModel):
    """What made a build (``manifest.config``): its options, the input's sha256, the family, the tokenizer and
    its special token ids.

    The options consumers read are typed fields; the other build options
    (:meth:`shardkit.config.BuildConfig.identity`) are kept as they were
    recorded, as extra fields, so the JSON is the build's whole identity.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    model: str
    family: FamilyInfo
    tokenizer: str
    tokenizer_fingerprint: str
    special_tokens: SpecialTokens
    input_sha256: str
    image_root: str | None = None
    train_on: str
    max_length: int
    max_image_pixels: int


class VideoSettings(BaseModel):
    """How a build's videos were sampled and sized (``manifest.video``, in builds that hold videos): the video
    processor whose rules were followed, frames sampled per second and their bounds, the pixel bounds (per frame,
    or over the clip's frames together: ``pixels_over``), Qwen2.5-VL's ``tokens_per_second`` (the temporal
    position step) and the ``<|video_pad|>`` token id."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    processor: str
    fps: float = Field(gt=0)
    min_frames: int = Field(ge=1)
    max_frames: int = Field(ge=1)
    min_pixels: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    pixels_over: Literal["frame", "clip"]
    tokens_per_second: float | None = None
    video_pad: int


class FolderManifest(BaseModel):
    """Base of the JSON file that completes a folder (a build, an embeddings cache): written last, keys sorted."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FILE: ClassVar[str]

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2) + "\n").encode()

    def write(self, fs: Any, folder: str) -> None:
        write_bytes(fs, join(folder, self.FILE), self.to_json())


class Manifest(FolderManifest):
    """A complete build."""

    FILE: ClassVar[str] = MANIFEST_NAME
    version: int = MANIFEST_VERSION
    format: str
    num_records: int
    num_samples: int
    num_images: int
    num_tokens: int
    num_trained_tokens: int
    num_trained_turns: int = 0
    """Messages trained (by ``train_on`` and their own ``loss``), over all samples; 0 in builds made before it was
    counted."""
    num_rejected: int
    num_fitted: int
    num_truncated: int
    num_boxes: int = 0
    """Grounding boxes written from records' objects; this and the two counts below are left out of the JSON while
    0, so that builds without boxes keep their bytes."""
    num_points: int = 0
    """Grounding points written from records' objects."""
    num_text_boxes: int = 0
    """Boxes and points the records' texts held already (rescaled or checked)."""
    rejects_by_code: dict[str, int]
    shards: list[ShardEntry]
    index: IndexFile
    config: BuildInfo
    created_by: str
    num_videos: int = 0
    num_video_frames: int = 0
    video: VideoSettings | None = None
    """How the videos were sampled and sized; None in a build without videos."""

    @model_serializer(mode="wrap")
    def _only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in WHEN_SET:
            if not data.get(key):
                data.pop(key, None)
        return data

    @property
    def num_grounded(self) -> int:
        """Boxes and points in the build, from objects and already in text: what rotation would move."""
        return self.num_boxes + self.num_points + self.num_text_boxes

    @cached_property
    def sha256(self) -> str:
        """The sha256 of this manifest's JSON (shard and index sha256s included): names the build."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @property
    def digest(self) -> str:
        """The build's identity in short: the first 16 hex digits of :attr:`sha256`."""
        return self.sha256[:16]


def family_problems(info: BuildInfo) -> list[str]:
    """How the family the manifest records differs from the definition of the family it names (an edited
    constant would change every batch's pixels); one problem per field, naming both values."""
    from shardkit.families import FAMILIES

    recorded = info.family.model_dump(mode="json")
    if (family := FAMILIES.get(recorded["name"])) is None:
        return [f"config.family.name is {recorded['name']!r}, not a model family this version knows "
                f"({', '.join(FAMILIES)})"]  # fmt: skip
    own = family.manifest_entry()
    problems = [
        f"config.family.{key} is {json.dumps(recorded[key])}, but {family.name}'s own is {json.dumps(value)}"
        for key, value in own.items()
        if recorded[key] != value
    ]
    if info.model != family.name:
        problems.append(f"config.model is {info.model!r}, but config.family.name is {family.name!r}")
    return problems


def read_manifest(location: str) -> Manifest:
    """The manifest of the build at ``location`` (folder or URL); :class:`ShardError` if absent or invalid."""
    return read_json_model(location, MANIFEST_NAME, Manifest, "shardkit build", "shardkit manifest")


def read_json_model(location: str, name: str, model: type[M], folder_kind: str, file_kind: str) -> M:
    """The JSON file ``name`` in the folder at ``location`` as a ``model``; :class:`ShardError` naming the
    folder (a ``folder_kind``) when it is absent, or the file (a ``file_kind``) when it is invalid."""
    fs, folder = open_fs(location)
    path = join(folder, name)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except Exception as exc:
        if (error := reading_error(exc, path)) is None:
            raise
        if isinstance(error, ShardMissingError):
            raise ShardMissingError(f"{location} has no {name}: not a complete {folder_kind}") from None
        raise error from None
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise ShardError(f"{path} is not a valid {file_kind}: {exc.errors()[0]['msg']}") from None
