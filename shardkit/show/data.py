"""What ``shardkit show`` reads from a build: a deterministic choice of samples, the rejects, the tokenizer."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from shardkit.errors import ConfigError
from shardkit.images import ImageRoot, to_rgb
from shardkit.load.source import BuildSource
from shardkit.shards import BuildInfo, Manifest, Sample
from shardkit.shards.folder import REJECTS_FILE
from shardkit.show.tokens import TokenDecoder
from shardkit.storage import join, open_fs
from shardkit.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

THUMBNAIL = 128  # longest side of a reject's thumbnail, pixels
MAX_REJECTS = 500  # rows of the rejects table


@dataclass(frozen=True)
class Reject:
    """One row of ``rejects.jsonl``, with a JPEG thumbnail when its image could be opened."""

    line: int | None
    code: str
    reason: str
    image: str | None
    thumbnail: bytes | None


def choose_ids(num_samples: int, count: int, seed: int) -> list[int]:
    """``count`` sample ids (all when fewer), drawn without replacement by ``seed``, in build order."""
    if count >= num_samples:
        return list(range(num_samples))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(num_samples, size=count, replace=False))


def ids_of_keys(source: BuildSource, keys: list[str]) -> list[int]:
    """The ids of the samples with these keys, in the order given; :class:`ConfigError` naming a missing key."""
    wanted, found = set(keys), {}
    for sample_id, sample in enumerate(source.samples(images=False)):
        if sample.key in wanted:
            found[sample.key] = sample_id
            if len(found) == len(wanted):
                break
    missing = [key for key in keys if key not in found]
    if missing:
        raise ConfigError(f"no sample with key {', '.join(missing)} in {source.location}")
    return [found[key] for key in dict.fromkeys(keys)]


def read_samples(source: BuildSource, *, count: int, seed: int, keys: list[str] | None = None) -> list[Sample]:
    """The samples to show: those with ``keys``, or ``count`` drawn by ``seed``."""
    ids = ids_of_keys(source, keys) if keys else choose_ids(len(source), count, seed)
    return [source.get(i) for i in ids]


def build_decoder(manifest: Manifest) -> TokenDecoder:
    """A decoder with the tokenizer the manifest names, from this machine only (a hub id is never downloaded);
    :class:`ConfigError` if it is not here or tokenizes differently."""
    tokenizer, info = load_tokenizer(manifest.config.tokenizer, offline=True)
    expected = manifest.config.tokenizer_fingerprint
    if info.fingerprint != expected:
        raise ConfigError(
            f"the tokenizer {info.name!r} loaded here is not the one the build used (fingerprint "
            f"{info.fingerprint[:12]} against {expected[:12]}): its tokens would be decoded wrongly"
        )
    return TokenDecoder(tokenizer)


def image_root_of(info: BuildInfo, image_root: str | None) -> str | None:
    """Where the rejected records' image paths are relative to: given, recorded by the build, or unknown."""
    return image_root or info.image_root


def _thumbnail(root: ImageRoot, ref: str, max_pixels: int) -> bytes | None:
    """A small JPEG of the image ``ref`` names, or None when it cannot be read or opened.

    Only paths inside the root are read (:class:`ImageRoot` refuses the rest,
    and URLs), and images over ``max_pixels`` are refused from their header, as
    the build does; an aspect ratio Qwen refuses still gets its thumbnail.
    """
    try:
        image = Image.open(io.BytesIO(root.read(ref)))
        if image.width * image.height > max_pixels:
            return None
        image.draft("RGB", (THUMBNAIL, THUMBNAIL))
        image = to_rgb(ImageOps.exif_transpose(image))
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=80)
    except Exception as exc:  # missing, outside the root, not an image, truncated: Pillow raises many types
        logger.debug("no thumbnail for %s: %s", ref, exc)
        return None
    return out.getvalue()


def read_rejects(
    location: str, manifest: Manifest, *, image_root: str | None, limit: int = MAX_REJECTS
) -> tuple[list[Reject], int]:
    """The first ``limit`` rows of the build's ``rejects.jsonl`` and how many rows it has."""
    fs, folder = open_fs(location)
    path = join(folder, REJECTS_FILE)
    lines, total = [], 0
    try:
        with fs.open(path, "rb") as f:
            for raw in f:  # streamed: only the first ``limit`` rows are kept
                if raw.strip():
                    total += 1
                    if len(lines) < limit:
                        lines.append(raw.decode("utf-8", errors="replace"))
    except FileNotFoundError:
        return [], 0
    root = image_root_of(manifest.config, image_root)
    images = ImageRoot(root) if root else None
    max_pixels = manifest.config.max_image_pixels
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = {"code": "unreadable", "reason": f"row {number} of {path} is not JSON"}
        image = row.get("image") if isinstance(row.get("image"), str) else None
        thumbnail = _thumbnail(images, image, max_pixels) if images and image else None
        rows.append(Reject(row.get("line"), str(row.get("code", "")), str(row.get("reason", "")), image, thumbnail))
    return rows, total
