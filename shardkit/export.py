"""Export a build for LLaMA-Factory: its sharegpt JSONL pointing at the build's resized images.

``export_llamafactory(build, DIR, name=NAME)`` writes::

    DIR/
      images/NAME/KEY_I.jpg   image I of sample KEY: the stored JPEG bytes, already on the model's grid
      NAME.jsonl              {"messages": [{"role": "user", "content": "<image>text ..."}, ...],
                               "images": ["images/NAME/KEY_0.jpg", ...]}
      dataset_info.json       the entry for NAME, merged into the entries already there

A message's content is its text with ``<image>`` where its images were, in
order, as LLaMA-Factory matches placeholders to ``images``; image paths are
relative to DIR, which LLaMA-Factory resolves against its ``dataset_dir``
(give ``dataset_dir: DIR`` and ``dataset: NAME``). Images stay out of
LLaMA-Factory's own resizing when its ``image_max_pixels`` is at least the
largest stored image (:attr:`ExportSummary.largest_image_pixels`).

Messages are written as the build stored them, so grounding boxes are the
coordinates written for the stored images. A build with absolute ones
(Qwen2.5-VL) is refused unless ``image_max_pixels`` and ``image_min_pixels``
say LLaMA-Factory will keep every stored image as it is
(:func:`check_absolute_boxes`).

A sample LLaMA-Factory would misread is left out and reported, never written:
text containing a placeholder (``<image>``, ``<video>``, ``<audio>``: it would
be counted as one), or turns that are not user/assistant in alternation from
a user turn to an assistant one after an optional system message (LLaMA-Factory
skips those).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from shardkit.errors import ConfigError, InputError, OutputError, RecordError, ShardError
from shardkit.families import FAMILIES
from shardkit.load.source import BuildSource
from shardkit.options import Options
from shardkit.shards import Manifest, Sample, read_manifest
from shardkit.storage import atomic_write, join, open_fs, write_bytes

logger = logging.getLogger(__name__)

DATASET_INFO = "dataset_info.json"
IMAGE_PLACEHOLDER = "<image>"
PLACEHOLDERS = (IMAGE_PLACEHOLDER, "<video>", "<audio>")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


#: LLaMA-Factory's defaults (``hparams/model_args.py``): it resizes an image over the first or under the second
LLAMAFACTORY_IMAGE_MAX_PIXELS, LLAMAFACTORY_IMAGE_MIN_PIXELS = 768 * 768, 32 * 32


class ExportOptions(Options):
    """The options of ``shardkit export``."""

    name: str = Field("shardkit", description="the data set's name in dataset_info.json")
    image_max_pixels: int | None = Field(
        None,
        ge=1,
        description="the image_max_pixels LLaMA-Factory will train with; a build with absolute box coordinates "
        "(qwen2_5_vl) is exported only when it is at least the build's --max-pixels, so that no stored image is "
        f"resized under its boxes (LLaMA-Factory's default: {LLAMAFACTORY_IMAGE_MAX_PIXELS})",
    )
    image_min_pixels: int = Field(
        LLAMAFACTORY_IMAGE_MIN_PIXELS,
        ge=1,
        description="the image_min_pixels LLaMA-Factory will train with; for absolute box coordinates it must be at "
        "most the build's --min-pixels",
    )
    progress: bool | None = Field(
        None, description="a progress bar on stderr (default: when stderr is a terminal; --no-progress: none)"
    )


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote, and the samples it left out (``{"line", "code", "reason", "key"}`` each)."""

    name: str
    samples: int
    images: int
    largest_image_pixels: int
    skipped: list[dict[str, Any]]


def dataset_info_entry(name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry of an exported data set: sharegpt, OpenAI-style role/content messages."""
    return {
        "file_name": f"{name}.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }


def llamafactory_messages(sample: Sample) -> list[dict[str, str]]:
    """The sample's conversation as LLaMA-Factory messages; :class:`RecordError` if it would misread them."""
    stored = sample.info.get("messages")
    if stored is None:
        raise InputError("the build holds no conversation text (built before shardkit stored it): rebuild it")
    messages, images = [], 0
    for i, message in enumerate(stored):
        pieces = []
        for part in message["content"]:
            if part["type"] == "image":
                pieces.append(IMAGE_PLACEHOLDER)
                images += 1
                continue
            if part["type"] == "video":
                raise RecordError(
                    "the sample has a video: export writes images only (its frames are a shardkit build's; "
                    "LLaMA-Factory would decode the clip again), so it is left out",
                    "llamafactory_video",
                )
            found = [p for p in PLACEHOLDERS if p in part["text"]]
            if found:
                raise RecordError(
                    f"messages[{i}] text contains {found[0]!r}, LLaMA-Factory's placeholder: it would count it "
                    "as a media item and misalign the images",
                    "llamafactory_placeholder",
                )
            pieces.append(part["text"])
        messages.append({"role": message["role"], "content": "".join(pieces)})
    if images != len(sample.images):
        raise ShardError(f"sample {sample.key} has {len(sample.images)} images but {images} in its messages")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns != ["user", "assistant"] * (len(turns) // 2):
        raise RecordError(
            f"turns {', '.join(roles)}: LLaMA-Factory's sharegpt format takes an optional system message, then "
            "user and assistant turns in alternation, ending with an assistant turn",
            "llamafactory_turns",
        )
    return messages


def export_llamafactory(build: str, out: str, **options: Any) -> ExportSummary:
    """Write the build at ``build`` (folder or fsspec URL) as a LLaMA-Factory data set into ``out``; ``options``
    are :class:`ExportOptions`' (``name``, ``progress``).

    Every file is written atomically, ``dataset_info.json`` last; an entry
    already there for ``name`` is replaced, other entries are kept.
    """
    from tqdm import tqdm

    name, progress = (export := ExportOptions.create(**options)).name, export.progress
    if not _NAME.match(name):
        raise ConfigError(
            f"data set name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
        )
    manifest = read_manifest(build)
    check_absolute_boxes(manifest, export)
    fs, folder = open_fs(out)
    info_path = join(folder, DATASET_INFO)
    dataset_info = _read_dataset_info(fs, info_path)
    samples = images = largest = 0
    skipped: list[dict[str, Any]] = []
    with (
        tqdm(
            total=manifest.num_samples, unit="sample", desc="export", disable=None if progress is None else not progress
        ) as bar,
        atomic_write(fs, join(folder, f"{name}.jsonl")) as jsonl,
    ):
        for sample in BuildSource(build, manifest=manifest).samples():
            bar.update(1)
            try:
                messages = llamafactory_messages(sample)
            except RecordError as exc:
                skipped.append({**exc.at(sample.info["line"]).to_json(), "key": sample.key})
                continue
            if not _NAME.match(sample.key):  # a key names files: nothing that could climb out of --out
                raise ShardError(
                    f"sample key {sample.key!r} in {build} is not a plain name; the shard is not shardkit's"
                )
            paths = [f"images/{name}/{sample.key}_{i}.jpg" for i in range(len(sample.images))]
            for path, jpeg, image in zip(paths, sample.images, sample.info["images"], strict=True):
                write_bytes(fs, join(folder, path), jpeg)
                largest = max(largest, image["width"] * image["height"])
            line = {"messages": messages, "images": paths}
            jsonl.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
            samples += 1
            images += len(paths)
    if name in dataset_info:
        logger.info("replacing the entry %r of %s", name, info_path)
    dataset_info[name] = dataset_info_entry(name)
    write_bytes(fs, info_path, (json.dumps(dataset_info, indent=2, ensure_ascii=False) + "\n").encode())
    return ExportSummary(name, samples, images, largest, skipped)


def check_absolute_boxes(manifest: Manifest, export: ExportOptions) -> None:
    """:class:`ConfigError` for a build whose boxes are absolute pixels of its stored images (Qwen2.5-VL) unless
    LLaMA-Factory, run with ``export``'s ``image_max_pixels`` and ``image_min_pixels``, keeps every stored image
    as it is: LLaMA-Factory resizes an image outside those bounds and leaves the coordinates in its text as they are
    (it has no grounding support: hiyouga/LLaMA-Factory#7240)."""
    family = FAMILIES.get(manifest.config.model)
    if not manifest.num_grounded or family is None or family.box_style is None or family.box_style.scale != "abs":
        return
    config = manifest.config.model_dump()
    low, high = config.get("min_pixels"), config.get("max_pixels")
    asked = export.image_max_pixels
    if not isinstance(low, int) or not isinstance(high, int):
        raise ConfigError("the build's manifest records no min_pixels / max_pixels: rebuild it")
    if asked is None or asked < high or export.image_min_pixels > low:
        raise ConfigError(
            f"the build holds {manifest.num_grounded} boxes and points in absolute pixels of its stored images "
            f"({family.name}), and LLaMA-Factory resizes an image over its image_max_pixels (default "
            f"{LLAMAFACTORY_IMAGE_MAX_PIXELS}) or under its image_min_pixels (default {LLAMAFACTORY_IMAGE_MIN_PIXELS}) "
            "without moving the coordinates in the text: train with image_max_pixels >= "
            f"{high} and image_min_pixels <= {low} (the build's bounds) and say so with --image-max-pixels {high}"
            + (f" --image-min-pixels {low}" if export.image_min_pixels > low else "")
        )


def _read_dataset_info(fs: Any, path: str) -> dict[str, Any]:
    """The entries of an existing ``dataset_info.json`` ({} if there is none)."""
    if not fs.exists(path):
        return {}
    with fs.open(path, "rb") as f:
        text = f.read()
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise OutputError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(entries, dict):
        raise OutputError(f"{path} is not a JSON object of data set entries; fix or remove it")
    return entries
