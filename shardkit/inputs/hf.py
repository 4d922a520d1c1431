"""Local Hugging Face data sets: Parquet or Arrow files, or a folder written by ``Dataset.save_to_disk``.

Each row has an image column (the ``Image`` feature, stored as ``{bytes, path}``,
or plain bytes) and a label or text column; the row becomes a user turn with
the image and the prompt, and an assistant turn with the text, or the label's
class name where the features name the classes (``ClassLabel``, as in
CIFAR-10's ``img``/``label`` layout). Columns are found by their features or
common names, or given with ``--image-column``, ``--label-column`` and
``--text-column``. Read with pyarrow, a row group at a time; rows are numbered
from 1 across the files in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.errors import InputError, RecordError
from shardkit.inputs.base import InputFormat, InputSummary, RawItem, data_uri, hash_files, validate_record
from shardkit.inputs.folder import DEFAULT_PROMPT
from shardkit.storage import open_fs, parent

IMAGE_NAMES = ("image", "img", "picture", "photo")
LABEL_NAMES = ("label", "labels", "class", "fine_label", "coarse_label")
TEXT_NAMES = ("text", "caption", "answer", "response")


class HFDataset(InputFormat):
    """Rows of local Parquet / Arrow files as image-text records."""

    name = "hf"
    unit = "row"

    def files(self) -> list[str]:
        fs, path = open_fs(self.location)
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith((".parquet", ".arrow")))
        else:
            found = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        if not found:
            raise InputError(f"no .parquet or .arrow files in {self.location}")
        protocol = self.location.split("://", 1)[0] + "://" if "://" in self.location else ""
        return [protocol + p if protocol and not p.startswith(protocol) else p for p in found]

    def _tables(self) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
        for file in self.files():
            fs, path = open_fs(file)
            with fs.open(path, "rb") as f:
                if path.endswith(".parquet"):
                    parquet = pq.ParquetFile(f)
                    yield parquet.schema_arrow, parquet.iter_batches(batch_size=256)
                else:
                    yield _arrow(f)

    def columns(self, schema: pa.Schema) -> dict[str, Any]:
        """The image, label and text columns of ``schema``, and the label's class names if the features give them."""
        features = _features(schema)
        names = schema.names
        image = (
            self.options.get("image_column")
            or next((n for n in names if (features.get(n) or {}).get("_type") == "Image"), None)
            or next((n for n in IMAGE_NAMES if n in names), None)
        )
        label = self.options.get("label_column") or next((n for n in LABEL_NAMES if n in names), None)
        text = self.options.get("text_column") or next((n for n in TEXT_NAMES if n in names), None)
        if self.options.get("text_column"):
            label = self.options.get("label_column")
        for given, value in (("image", image), ("label", label), ("text", text)):
            if value is not None and value not in names:
                raise InputError(
                    f"{self.location} has no column {value!r} for the {given}; columns: {', '.join(names)}"
                )
        if image is None:
            raise InputError(
                f"{self.location}: no image column found; name it with --image-column ({', '.join(names)})"
            )
        if label is None and text is None:
            raise InputError(f"{self.location}: no label or text column; name one with --label-column or --text-column")
        classes = (features.get(label) or {}).get("names") if label else None
        return {"image": image, "label": None if text else label, "text": text, "classes": classes}

    def items(self) -> Iterator[RawItem]:
        number = 0
        for schema, batches in self._tables():
            columns = self.columns(schema)
            wanted = [c for c in (columns["image"], columns["label"], columns["text"]) if c]
            for batch in batches:
                for row in batch.select(wanted).to_pylist():
                    number += 1
                    yield RawItem(number, {"row": row, "columns": columns})

    def summary(self) -> InputSummary:
        rows = 0
        for file in self.files():
            fs, path = open_fs(file)
            with fs.open(path, "rb") as f:
                if path.endswith(".parquet"):
                    rows += pq.ParquetFile(f).metadata.num_rows
                else:
                    rows += sum(batch.num_rows for batch in _arrow(f)[1])
        return InputSummary(rows, hash_files(self.files()))

    def record(self, item: RawItem):
        assert isinstance(item.data, dict)
        row, columns = item.data["row"], item.data["columns"]
        value = row[columns["image"]]
        data = value.get("bytes") if isinstance(value, dict) else value
        if isinstance(data, bytes | bytearray) and data:
            image = data_uri(bytes(data))
        elif isinstance(value, dict) and value.get("path"):
            image = value["path"]  # an Image feature that points to a file instead of holding it
        elif isinstance(value, str) and value:
            image = value  # a column of image paths
        else:
            raise RecordError(f"the image column {columns['image']!r} is empty", "image_missing", item.line)
        if columns["text"]:
            reply = row[columns["text"]]
        else:
            reply = row[columns["label"]]
            if columns["classes"] and isinstance(reply, int) and 0 <= reply < len(columns["classes"]):
                reply = columns["classes"][reply]
        if reply is None or str(reply) == "":
            raise RecordError("no label or text", "invalid_record", item.line)
        prompt = self.options.get("prompt") or DEFAULT_PROMPT
        record = {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": str(reply)},
            ],
            "meta": {"row": item.line, **({"label": row[columns["label"]]} if columns["label"] else {})},
        }
        return validate_record(record, item.line)

    def image_root(self) -> str:
        fs, path = open_fs(self.location)
        return self.location if fs.isdir(path) else parent(self.location)


def _arrow(f: Any) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Schema and record batches of an Arrow IPC file, in the stream form ``save_to_disk`` writes or the file form."""
    try:
        stream = pa.ipc.open_stream(f)
        return stream.schema, iter(stream)
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _features(schema: pa.Schema) -> dict[str, Any]:
    """The ``datasets`` features stored in a file's schema metadata (empty if none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return info.get("info", {}).get("features", {}) or {}
