"""An image folder with ``labels.json`` (``{"image1.jpg": "cat", ...}``): image classification.

Each entry becomes a user turn with the image and the prompt (default
"Classify this image.") and an assistant turn with the label. Entries are
numbered from 1 in the file's order; the location is the folder or its
``labels.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from shardkit.errors import InputError, RecordError
from shardkit.inputs.base import InputFormat, RawItem, open_location, validate_record
from shardkit.schema import Record
from shardkit.storage import join, open_fs, parent

LABELS = "labels.json"
DEFAULT_PROMPT = "Classify this image."


class ImageFolder(InputFormat):
    """Image classification from a folder and its ``labels.json``."""

    name = "folder"
    unit = "entry"

    def labels_file(self) -> str:
        fs, path = open_fs(self.location)
        return self.location if not fs.isdir(path) else join(self.location.rstrip("/"), LABELS)

    def items(self) -> Iterator[RawItem]:
        with open_location(self.labels_file()) as f:
            try:
                labels = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"{self.labels_file()} is not valid JSON: {exc}") from None
        if not isinstance(labels, dict):
            raise InputError(f'{self.labels_file()} must be an object {{"image.jpg": "label", ...}}')
        for number, (image, label) in enumerate(labels.items(), start=1):
            yield RawItem(number, {"image": image, "label": label})

    def record(self, item: RawItem) -> Record:
        assert isinstance(item.data, dict)
        image, label = item.data["image"], item.data["label"]
        if not isinstance(label, str | int | float) or isinstance(label, bool) or str(label) == "":
            raise RecordError(f"label of {image!r} must be a non-empty string or number", "invalid_record", item.number)
        prompt: str = self.options.get("prompt") or DEFAULT_PROMPT
        record: dict[str, Any] = {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": str(label)},
            ],
            "meta": {"image": image, "label": label},
        }
        return validate_record(record, item.number)

    def image_root(self) -> str:
        return parent(self.labels_file())

    def files(self) -> list[str]:
        return [self.labels_file()]
