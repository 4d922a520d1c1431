"""Tinker Datums from a build, with the stream's resume state.

A stored sample becomes a ``tinker.Datum`` the way tinker-cookbook's
``conversation_to_datum`` makes one: the model input is the token sequence
with each image's pad tokens replaced by an ``ImageChunk`` (the stored JPEG,
``expected_tokens`` = its pad count), shifted right by one token; the loss
inputs are ``target_tokens`` (the sequence shifted left, 0 at image positions)
and ``weights`` (shifted likewise, divided by their sum with
``reduction="mean"``, cookbook's default). No image is decoded. A build with
videos is refused: Tinker's model input has image and text chunks, no video.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import tinker

from shardkit.errors import ConfigError
from shardkit.load.stream import ShardStream, StreamBatches
from shardkit.shards import Sample

#: why a video cannot become a Datum, and what to do instead
NO_VIDEO = (
    "Tinker takes no video (its model input has image and text chunks only); train the build locally "
    "(shardkit train --backend local), or build Tinker's data without the video records"
)


def sample_to_datum(sample: Sample, *, reduction: Literal["mean", "none"] = "mean") -> tinker.Datum:
    """One stored sample as a training Datum for Tinker's ``cross_entropy`` loss."""
    if reduction not in ("mean", "none"):
        raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if sample.videos or sample.info.get("videos"):
        raise ConfigError(f"sample {sample.key} has a video: {NO_VIDEO}")
    ids = sample.input_ids.astype(np.int64)
    targets = ids.copy()
    segments: list[tuple[int, int, bytes | None]] = []  # (start, end, jpeg or None for text)
    position = 0
    for jpeg, image in zip(sample.images, sample.info["images"], strict=True):
        start, end = image["token_start"], image["token_start"] + image["num_tokens"]
        if start > position:
            segments.append((position, start, None))
        segments.append((start, end, jpeg))
        targets[start:end] = 0
        position = end
    if position < len(ids):
        segments.append((position, len(ids), None))
    while segments[-1][2] is not None:  # a trailing image has nothing after it to predict
        segments.pop()
    length = segments[-1][1]
    chunks: list[Any] = []
    for start, end, jpeg in segments:
        if jpeg is not None:
            chunks.append(tinker.types.ImageChunk(data=jpeg, format="jpeg", expected_tokens=end - start))
        elif start < (stop := min(end, length - 1)):  # the input stops one token short: shifted right
            chunks.append(tinker.types.EncodedTextChunk(tokens=ids[start:stop].tolist()))
    weights = sample.weights[1:length].astype(np.float32)
    if reduction == "mean" and weights.sum() > 0:
        weights = weights / weights.sum()
    target_tokens = targets[1:length]
    return tinker.Datum(
        model_input=tinker.ModelInput(chunks=chunks),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData(data=target_tokens.tolist(), dtype="int64", shape=[len(target_tokens)]),
            "weights": tinker.TensorData(data=weights.tolist(), dtype="float32", shape=[len(weights)]),
        },
    )


class DatumBatches(StreamBatches):
    """Batches of ``tinker.Datum`` from a :class:`ShardStream`, with its resume state."""

    def __init__(self, stream: ShardStream, *, reduction: Literal["mean", "none"] = "mean"):
        if stream.batching.pack_tokens is not None:
            raise ConfigError("Tinker takes one Datum per sample: batch the stream by batch_size or max_tokens")
        if videos := getattr(stream.source.manifest, "num_videos", 0):
            raise ConfigError(f"{stream.source.location} holds {videos} videos: {NO_VIDEO}")
        self.stream = stream
        self.reduction = reduction

    def __iter__(self) -> Iterator[list[tinker.Datum]]:
        for batch in self.stream:
            yield [sample_to_datum(s, reduction=self.reduction) for s in batch]
