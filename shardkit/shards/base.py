"""The sample as stored, and the writer/reader contract every shard format follows.

A sample is its key, a JSON dict (source line, meta, image sizes and grids,
token counts), ``input_ids`` (int32), ``weights`` (float32: the weight of
token i as a training target, so ``labels[i] = input_ids[i]`` where weight > 0
else -100), its images as JPEG bytes in order of appearance and, where it has
videos, each video's sampled frames as JPEG bytes (unpadded: a model's temporal
patch repeats the last frame of an odd count). Readers take the JSON through
its typed model, :class:`SampleInfo`.

Every sample gets a checksum when it is written (xxh3-64, recorded in the
index; what it covers is the format's: see each writer), and readers given it
check it, so a flipped bit raises :class:`ChecksumMismatch` instead of being
read as different data.
"""

from __future__ import annotations

import functools
import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from shardkit.errors import ShardError
from shardkit.shards.manifest import ShardEntry
from shardkit.storage import AtomicFile, HashingWriter


class StoredImage(BaseModel):
    """What a sample's JSON records of one of its images (strict: a number is a JSON number)."""

    model_config = ConfigDict(strict=True, frozen=True)
    source: str = ""
    original_width: int = Field(ge=1)
    original_height: int = Field(ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    grid_thw: list[int] = Field(min_length=3, max_length=3)
    token_start: int = Field(ge=0)
    num_tokens: int = Field(ge=0)
    orientation: int = Field(1, ge=1, le=8)
    """The EXIF orientation of the source file (recorded, where not 1, for samples with boxes: their frame)."""


class StoredBox(BaseModel):
    """What a sample's JSON records of one grounding box or point (:func:`shardkit.boxes.stored_boxes`)."""

    model_config = ConfigDict(strict=True, frozen=True)
    image: int = Field(ge=0)
    label: str | None = None
    kind: Literal["box", "point"]
    source: list[int | float]
    space: Literal["real", "norm1", "norm1000"]
    written: list[int]
    scale: Literal["abs", "rel1000"]


class TextBoxes(BaseModel):
    """How many boxes and points a sample's text held already, and how many of them were rescaled."""

    model_config = ConfigDict(strict=True, frozen=True)
    found: int = Field(ge=0)
    rescaled: int = Field(ge=0)


class StoredVideo(BaseModel):
    """What a sample's JSON records of one of its videos: the clip (frames, rate, duration, size), the frames kept
    (their indices in the clip, their times as the processors count them, ``index / source_fps``, and as decoded),
    the size they are stored at, the grid, Qwen2.5-VL's ``second_per_grid_t``, Qwen3-VL's timestamps, and where its
    tokens are: ``spans`` (``[start, count]`` of each ``<|video_pad|>`` run: one, or one per temporal patch)."""

    model_config = ConfigDict(strict=True, frozen=True)
    source: str = ""
    frame_list: bool = False
    source_frames: int = Field(ge=1)
    source_fps: float = Field(gt=0)
    duration: float = Field(ge=0)
    original_width: int = Field(ge=1)
    original_height: int = Field(ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    frame_indices: list[int] = Field(min_length=1)
    frame_times: list[float]
    decoded_times: list[float | None]
    grid_thw: list[int] = Field(min_length=3, max_length=3)
    second_per_grid_t: float | None = None
    timestamps: list[str] = []
    spans: list[list[int]] = Field(min_length=1)
    token_start: int = Field(ge=0)
    num_tokens: int = Field(ge=0)


class SampleInfo(BaseModel):
    """A sample's JSON, typed (strict: a number is a JSON number); what readers of a build rely on."""

    model_config = ConfigDict(strict=True, frozen=True)
    key: str
    line: int = Field(ge=0)
    meta: Any = None
    num_tokens: int = Field(ge=0)
    num_trained_tokens: int = Field(ge=0)
    images: list[StoredImage]
    videos: list[StoredVideo] = []
    messages: list[Any] | None = None
    fitted: bool = False
    truncated_tokens: int = Field(0, ge=0)
    objects: Any = None
    """The record's grounding objects as given (samples with boxes only)."""
    boxes: list[StoredBox] = []
    text_boxes: TextBoxes | None = None


@dataclass
class Sample:
    """One training sample as stored in a shard."""

    key: str
    info: dict[str, Any]
    input_ids: np.ndarray
    weights: np.ndarray
    images: list[bytes] = field(default_factory=list)
    videos: list[list[bytes]] = field(default_factory=list)

    @functools.cached_property
    def stored(self) -> SampleInfo:
        """``info`` through its typed model; :class:`pydantic.ValidationError` when a field is not what it must be."""
        return SampleInfo.model_validate(self.info)

    @functools.cached_property
    def info_json(self) -> bytes:
        """The JSON member, byte-stable (sorted keys, compact); computed once (``info`` is not changed after)."""
        return json.dumps(
            self.info, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()

    @property
    def payload_bytes(self) -> int:
        """Bytes this sample adds to a shard, before container overhead."""
        frames = sum(len(frame) for video in self.videos for frame in video)
        return self.input_ids.nbytes + self.weights.nbytes + sum(map(len, self.images)) + frames + len(self.info_json)


def checksum_of(data: bytes | memoryview) -> int:
    """The checksum of one stored byte string (xxh3-64, unsigned)."""
    return xxhash.xxh3_64_intdigest(data)


def content_checksum(
    key: str,
    info_json: bytes,
    input_ids: np.ndarray,
    weights: np.ndarray,
    images: list[bytes],
    videos: list[list[bytes]] = (),  # type: ignore[assignment]
) -> int:
    """The checksum of a sample's values: key, JSON text, int32 ids, float32 weights, images, then the videos'
    frames, each length-prefixed (the JSON says how many frames each video has)."""
    digest = xxhash.xxh3_64()
    ids = np.ascontiguousarray(input_ids, dtype="<i4")
    weights = np.ascontiguousarray(weights, dtype="<f4")
    frames = [frame for video in videos for frame in video]
    for part in (key.encode(), info_json, memoryview(ids).cast("B"), memoryview(weights).cast("B"), *images, *frames):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.intdigest()


class ChecksumMismatch(ShardError):
    """A sample's stored bytes do not match the checksum recorded when it was written."""

    def __init__(self, key: str | None):
        super().__init__(f"sample {key!r} does not match its checksum" if key else "sample does not match its checksum")
        self.key = key


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=False)
    return out.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


class ShardPart(ShardEntry):
    """A shard file as its writer closed it: its manifest entry, and per sample its location and token count.

    ``locations[i]`` is ``(offset, size, checksum)`` of sample i: for tar, the
    byte range of its members; for Parquet, its row number and 1.
    """

    locations: list[tuple[int, int, int]]
    tokens: list[int]

    def entry(self) -> ShardEntry:
        """The shard's manifest entry."""
        return ShardEntry(**self.model_dump(include=set(ShardEntry.model_fields)))


class ShardFile(ABC):
    """One shard file written atomically and hashed as it is written; ``close()`` publishes it.

    Use as a context manager: leaving with an exception discards the partial file.
    """

    def __init__(self, fs: Any, path: str, *, videos: bool = False):
        self.path = path
        self.videos = videos  # whether the file can hold videos (a format whose layout depends on it)
        self.locations: list[tuple[int, int, int]] = []
        self.tokens: list[int] = []
        self._file = AtomicFile(fs, path)
        self._hashed = HashingWriter(self._file.file)
        self._closed = False

    @property
    def num_samples(self) -> int:
        return len(self.locations)

    def _record(self, offset: int, size: int, checksum: int, tokens: int) -> None:
        """Note where the sample just written lies, its checksum and its token count."""
        self.locations.append((offset, size, checksum))
        self.tokens.append(tokens)

    @abstractmethod
    def _finish(self) -> None:
        """Write the format's trailer to ``self._hashed``."""

    def close(self) -> ShardPart:
        """Publish the shard (an identical one left by an interrupted run is kept untouched)."""
        self._finish()
        self._closed = True
        sha256 = self._hashed.sha256.hexdigest()
        self._file.commit(unless_sha256=sha256)
        return ShardPart(
            path=self.path.rsplit("/", 1)[-1],
            num_samples=self.num_samples,
            num_tokens=sum(self.tokens),
            bytes=self._hashed.bytes,
            sha256=sha256,
            locations=self.locations,
            tokens=self.tokens,
        )

    def abort(self, exc: BaseException) -> None:
        """Discard the partial file (after ``exc``)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._finish()  # release the format writer before its file goes away
        except Exception:
            pass
        self._file.discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)


class ShardWriter(ShardFile):
    """Writes samples into one shard file of a format (see :class:`ShardFile`)."""

    format: ClassVar[str]
    suffix: ClassVar[str]

    @abstractmethod
    def write(self, sample: Sample) -> None:
        """Append one sample (and record its location, checksum and token count)."""

    def accepts(self, sample: Sample) -> bool:
        """Whether ``sample`` can go in this file (a file made without videos takes none, where the format's layout
        depends on it)."""
        return True


class ShardReader(ABC):
    """Reads the samples of one shard file at their recorded locations."""

    format: ClassVar[str]
    magic: ClassVar[tuple[int, bytes]]  # (offset, bytes) every file of this format has

    def recognises(self, head: bytes) -> bool:
        """Whether ``head``, a file's first 512 bytes, starts a file of this format."""
        offset, magic = self.magic
        return head[offset : offset + len(magic)] == magic

    @abstractmethod
    def open(self, f: Any) -> OpenShard:
        """Random access to the samples of seekable file ``f`` by their recorded locations."""


class OpenShard(ABC):
    """One shard opened for reading samples at their recorded ``(offset, size)``."""

    @abstractmethod
    def read_at(self, offset: int, size: int, checksum: int | None = None) -> Sample:
        """The sample at a location recorded by the writer; :class:`ChecksumMismatch` unless it has ``checksum``
        (None: unchecked)."""
