"""A build task's output: its shard parts, written by :class:`TaskShardWriter`, and its result record.

A task writes ``shard-TTTTTT-PPP`` files (task ``T``, part ``P``): one part,
or more when ``max_shard_bytes`` is reached. Its result (:class:`TaskResult`)
is saved as JSON in the build folder's ``_progress/`` once the parts are
published (:mod:`shardkit.shards.folder`).
"""

from __future__ import annotations

import re
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from shardkit.ledger import Ledger
from shardkit.shards.base import Sample, ShardPart, ShardWriter
from shardkit.storage import join

SHARD_NAME = re.compile(r"shard-\d{6}-\d{3}\.(tar|parquet)")  # a build shard's exact name


def shard_name(task: int, part: int, suffix: str) -> str:
    """The file name of part ``part`` of task ``task``'s shards."""
    return f"shard-{task:06d}-{part:03d}{suffix}"


class TaskRecord(BaseModel):
    """What every finished task records: its index and the shard parts it wrote."""

    model_config = ConfigDict(extra="ignore")  # a kind of task reads its own fields (its subclass forbids others)
    index: int = Field(ge=0)
    shards: list[ShardPart] = []

    def to_json(self) -> bytes:
        """The record as saved in ``_progress/`` (unset optional fields left out)."""
        return self.model_dump_json(exclude={name for name, value in self if value is None}).encode()


class TaskResult(TaskRecord):
    """A finished build task: its shard parts, rejects (``RecordError.to_json()`` rows), counts, the image
    files it read (a :data:`~shardkit.ledger.Ledger`) and the first internal error's traceback, if any."""

    model_config = ConfigDict(extra="forbid")
    rejects: list[dict[str, Any]] = []
    records: int = 0
    images: int = 0
    videos: int = 0
    video_frames: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    trained_turns: int = 0
    fitted: int = 0
    truncated: int = 0
    boxes: int = 0
    points: int = 0
    text_boxes: int = 0
    seconds: float = 0.0
    read: Ledger = {}
    traceback: str | None = None

    def add(self, sample: Sample) -> None:
        """Count a written sample."""
        self.images += len(sample.images)
        self.videos += len(sample.videos)
        self.video_frames += sum(map(len, sample.videos))
        self.tokens += len(sample.input_ids)
        self.trained_tokens += sample.info["num_trained_tokens"]
        self.trained_turns += sample.info["num_trained_turns"]
        self.fitted += bool(sample.info["fitted"])
        self.truncated += bool(sample.info["truncated_tokens"])
        kinds = [box["kind"] for box in sample.info.get("boxes", ())]
        self.boxes += kinds.count("box")
        self.points += kinds.count("point")
        self.text_boxes += sample.info.get("text_boxes", {}).get("found", 0)


class TaskShardWriter:
    """Writes one task's samples into its shard parts in ``folder``, in order.

    A part is closed, and the next begun, when the next sample would take it
    over ``max_bytes`` of sample payload (a sample is never split; a part holds
    at least one), or when the next sample has videos and the part, begun
    without, cannot take them (Parquet's videos column). ``close()`` publishes the last part and returns them all.
    Use as a context manager: leaving with an exception discards the part
    being written.
    """

    def __init__(self, fs: Any, folder: str, task: int, writer: type[ShardWriter], max_bytes: int):
        self.fs, self.folder, self.task = fs, folder, task
        self.writer, self.max_bytes = writer, max_bytes
        self.parts: list[ShardPart] = []
        self._part: ShardWriter | None = None
        self._part_bytes = 0

    def write(self, sample: Sample) -> None:
        """Append ``sample`` to the current part, or to a new one when it would overflow."""
        size = sample.payload_bytes
        if self._part is not None and (self._part_bytes + size > self.max_bytes or not self._part.accepts(sample)):
            self._close_part()
        if self._part is None:
            name = shard_name(self.task, len(self.parts), self.writer.suffix)
            self._part = self.writer(self.fs, join(self.folder, name), videos=bool(sample.videos))
            self._part_bytes = 0
        self._part.write(sample)
        self._part_bytes += size

    def _close_part(self) -> None:
        part, self._part = self._part, None
        if part is not None:
            self.parts.append(part.close())

    def close(self) -> list[ShardPart]:
        """Publish the last part; every part written, in order."""
        self._close_part()
        return self.parts

    def abort(self, exc: BaseException) -> None:
        """Discard the part being written (after ``exc``); published parts stay."""
        if self._part is not None:
            self._part.abort(exc)
            self._part = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)
