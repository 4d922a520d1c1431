"""``shardkit stats``: what is in a build, from its manifest and shards.

The seed's statistics (samples, images, images per sample, top diagnoses from
``meta``) plus token-length and image-size distributions, rejects by reason,
how many samples were fitted or truncated, the grounding boxes and points
written (and rejected), and, in a build with videos, frames and tokens per clip
(and per second of video). Image bytes are checked, never decoded.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from pydantic import Field

from shardkit.boxes import REJECT_CODES as BOX_REJECTS
from shardkit.load.source import BuildSource
from shardkit.options import Options
from shardkit.shards import Manifest, read_manifest
from shardkit.words import counted


def _distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    values = {"min": array.min(), "mean": array.mean(), "p50": p50, "p90": p90, "p99": p99, "max": array.max()}
    return {name: float(f"{value:.4g}") for name, value in values.items()}


class StatsOptions(Options):
    """The options of ``shardkit stats`` (a mix's builds and weights are :class:`~shardkit.train.DataOptions`)."""

    meta_key: str = Field("diagnosis", description="meta field whose most common values are listed")
    top: int = Field(10, ge=1, description="how many values to list")
    epoch: int = Field(0, description="mix: the epoch to describe")
    seed: int = Field(0, description="mix: the shuffling seed")


def build_stats(location: str, **options: Any) -> dict[str, Any]:
    """Statistics of the build at ``location`` as a JSON-ready dict; ``options``: :class:`StatsOptions`' ``meta_key``
    and ``top``."""
    asked = StatsOptions.create(**options)
    manifest: Manifest = read_manifest(location)
    tokens, trained, per_sample, pixels, image_tokens, originals = [], [], [], [], [], []
    frames, video_tokens, seconds = [], [], []
    labels: Counter[str] = Counter()
    meta_keys: set[str] = set()
    for sample in BuildSource(location, manifest=manifest).samples(images=False):
        info = sample.info
        tokens.append(info["num_tokens"])
        trained.append(info["num_trained_tokens"])
        per_sample.append(len(info["images"]))
        for image in info["images"]:
            pixels.append(image["width"] * image["height"])
            image_tokens.append(image["num_tokens"])
            originals.append(image["original_width"] * image["original_height"])
        for video in info.get("videos", ()):
            frames.append(len(video["frame_indices"]))
            video_tokens.append(video["num_tokens"])
            seconds.append(video["duration"])
        meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
        meta_keys.update(meta)
        value = meta.get(asked.meta_key)
        if isinstance(value, (str, int, float, bool)):
            labels[str(value)] += 1
    config = manifest.config
    videos = {}
    if manifest.num_videos:
        videos = {
            "videos": manifest.num_videos,
            "video_frames": manifest.num_video_frames,
            "frames_per_video": _distribution(frames),
            "tokens_per_video": _distribution(video_tokens),
            "video_seconds": _distribution(seconds),
            "video_tokens_per_second": _distribution([n / s for n, s in zip(video_tokens, seconds, strict=True) if s]),
        }
    return {
        "location": location,
        "format": manifest.format,
        "model": config.model,
        "max_length": config.max_length,
        "records": manifest.num_records,
        "samples": manifest.num_samples,
        "rejected": manifest.num_rejected,
        "rejects_by_code": manifest.rejects_by_code,
        "duplicates": manifest.rejects_by_code.get("duplicate", 0),
        "shards": len(manifest.shards),
        "bytes": sum(s.bytes for s in manifest.shards),
        "images": manifest.num_images,
        "images_per_sample": _distribution(per_sample),
        "images_per_sample_counts": dict(sorted(Counter(per_sample).items())),
        "fitted": manifest.num_fitted,
        "truncated": manifest.num_truncated,
        "boxes": manifest.num_boxes,
        "points": manifest.num_points,
        "text_boxes": manifest.num_text_boxes,
        "box_rejects": {code: n for code, n in manifest.rejects_by_code.items() if code in BOX_REJECTS},
        "tokens": manifest.num_tokens,
        "trained_tokens": manifest.num_trained_tokens,
        "tokens_per_sample": _distribution(tokens),
        "trained_tokens_per_sample": _distribution(trained),
        "stored_image_megapixels": _distribution([p / 1e6 for p in pixels]),
        "original_image_megapixels": _distribution([p / 1e6 for p in originals]),
        "tokens_per_image": _distribution(image_tokens),
        "meta_key": asked.meta_key,
        "meta_keys": sorted(meta_keys),
        "unique_labels": len(labels),
        "top_labels": labels.most_common(asked.top),
        **videos,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The human-readable report printed by ``shardkit stats``."""

    def dist(d: dict[str, float], unit: str = "") -> str:
        if not d:
            return "-"
        return (
            f"min {d['min']:g}{unit}, p50 {d['p50']:g}{unit}, mean {d['mean']:g}{unit}, "
            f"p90 {d['p90']:g}{unit}, p99 {d['p99']:g}{unit}, max {d['max']:g}{unit}"
        )

    lines = [
        f"Build {stats['location']} ({stats['format']}, {stats['model']}, max_length {stats['max_length']})",
        f"  Records read:          {stats['records']}",
        f"  Samples:               {stats['samples']} in {counted(stats['shards'], 'shard')} "
        f"({stats['bytes'] / 1e6:.1f} MB)",
        f"  Rejected:              {stats['rejected']}"
        + (f"  ({', '.join(f'{k}: {v}' for k, v in stats['rejects_by_code'].items())})" if stats["rejected"] else ""),
        f"  Duplicates removed:    {stats['duplicates']}",
        f"  Images:                {stats['images']}",
        f"  Images per sample:     {stats['images_per_sample'].get('mean', 0):g} on average "
        f"({', '.join(f'{k}: {v}' for k, v in stats['images_per_sample_counts'].items())})",
        f"  Fitted to max_length:  {counted(stats['fitted'], 'sample')} (images lowered in resolution)",
        f"  Truncated:             {counted(stats['truncated'], 'sample')}",
        f"  Tokens:                {stats['tokens']} ({stats['trained_tokens']} trained)",
        f"  Tokens per sample:     {dist(stats['tokens_per_sample'])}",
        f"  Trained per sample:    {dist(stats['trained_tokens_per_sample'])}",
        f"  Tokens per image:      {dist(stats['tokens_per_image'])}",
        f"  Stored image size:     {dist(stats['stored_image_megapixels'], ' MP')}",
        f"  Original image size:   {dist(stats['original_image_megapixels'], ' MP')}",
    ]
    if stats.get("videos"):  # a build with videos
        lines[7:7] = [
            f"  Videos:                {stats['videos']} ({stats['video_frames']} frames stored)",
            f"  Frames per video:      {dist(stats['frames_per_video'])}",
            f"  Tokens per video:      {dist(stats['tokens_per_video'])}",
            f"  Video length:          {dist(stats['video_seconds'], ' s')}",
            f"  Video tokens a second: {dist(stats['video_tokens_per_second'])}",
        ]
    if stats["boxes"] or stats["points"] or stats["text_boxes"] or stats["box_rejects"]:
        rejected = ", ".join(f"{k}: {v}" for k, v in stats["box_rejects"].items()) or "none"
        lines.append(
            f"  Grounding:             {counted(stats['boxes'], 'box', 'boxes')} and "
            f"{counted(stats['points'], 'point')} from objects, {stats['text_boxes']} in the text; rejected: {rejected}"
        )
    if stats["top_labels"]:  # only for a meta key the samples have
        lines.append(f"  Unique {stats['meta_key']} values: {stats['unique_labels']}")
        lines.append(f"  Top {len(stats['top_labels'])} {stats['meta_key']} values:")
        lines += [f"    - {label}: {count}" for label, count in stats["top_labels"]]
    return "\n".join(lines)


def mix_stats(
    builds: list[str],
    *,
    weights: list[float] | None = None,
    mix_file: str | None = None,
    epoch_size: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """What one epoch of a mix reads from each build (one reader): slots, distinct samples, share; ``options``:
    :class:`StatsOptions`' ``epoch`` and ``seed``."""
    from shardkit.load.mix import MixStream, open_stream

    asked = StatsOptions.create(**options)
    epoch, seed = asked.epoch, asked.seed
    stream = open_stream(
        builds, weights=weights, mix_file=mix_file, epoch_size=epoch_size, batch_size=1, seed=seed, world_size=1, rank=0
    )
    if not isinstance(stream, MixStream):
        stream = MixStream(builds, batch_size=1, seed=seed, world_size=1, rank=0)
    return {"epoch": epoch, "seed": seed, "epoch_size": stream.epoch_size, "mix": stream.epoch_shares(epoch)}


def format_mix_stats(stats: dict[str, Any]) -> str:
    """The human-readable mix report printed by ``shardkit stats`` for several builds or a mix file."""
    lines = [f"Mix, epoch {stats['epoch']} (seed {stats['seed']}): {stats['epoch_size']} samples"]
    for row in stats["mix"]:
        lines.append(
            f"  {row['build']}: weight {row['weight']:g} (target {row['target_share']:.2%}), read {row['read']} "
            f"= {row['share']:.2%}, {row['distinct']} distinct of {row['samples']}"
        )
    return "\n".join(lines)
