"""Local Hugging Face data sets: Parquet or Arrow files, or a folder written by ``Dataset.save_to_disk``.

Three row shapes, chosen by the columns:

- conversations: a ``messages`` / ``conversations`` / ``conversation`` column
  (role/content or from/value turns, or ms-swift's ``{"human", "assistant"}``
  pairs; string contents with ``<image>`` placeholders, or part lists as
  ``{"type": "image", "index": 0}``) and an ``images`` (list) or ``image``
  column, as TRL and LLaMA-Factory write them; or TRL's ``prompt`` and
  ``completion`` columns (see :class:`~shardkit.inputs.jsonl.Trl`), as in
  ``trl-lib/llava-instruct-mix``; an ``objects`` column holds grounding boxes (ms-swift's struct of ``ref``,
  ``bbox``, ``bbox_type``, ``image_id``, or a list of ``bbox_2d`` / ``point_2d`` objects: :mod:`shardkit.boxes`);
- the_cauldron: ``images`` and ``texts``, a list of ``{"user", "assistant"}``
  pairs, one turn pair each;
- one image with an answer: an image column (the ``Image`` feature, stored as
  ``{bytes, path}``, or plain bytes) and a label or text column, with an
  optional question column (``question``, ``query``, ``--question-column``)
  as the user's text instead of ``--prompt``. The answer is the text, or the
  label's class name where the features name the classes (``ClassLabel``, as
  in CIFAR-10's ``img``/``label`` layout). A list of answers (VQA's several
  annotators) becomes its most frequent entry, the first of equals.

Columns are found by their features or common names, or given with
``--image-column``, ``--label-column``, ``--text-column`` and
``--question-column``. Both the current ``datasets`` layout (``List``
features) and the older one (``Sequence`` features, or plain JSON lists) are
read. Read with pyarrow, a row group at a time; rows are numbered from 1
across the files in order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.errors import InputError, RecordError
from shardkit.inputs.base import (
    InputFormat,
    RawItem,
    open_location,
    refuse_placeholders,
    refuse_unsupported,
    validate_record,
)
from shardkit.inputs.chat import Placeholders, prompt_completion_turns, to_messages
from shardkit.inputs.folder import DEFAULT_PROMPT
from shardkit.schema import InlineImage, Record
from shardkit.storage import open_fs, parent

IMAGE_NAMES = ("image", "img", "picture", "photo")
IMAGES_NAMES = ("images", "image")
LABEL_NAMES = ("label", "labels", "class", "fine_label", "coarse_label")
TEXT_NAMES = ("text", "caption", "answer", "answers", "response")
QUESTION_NAMES = ("question", "query", "prompt", "instruction")
CHAT_NAMES = ("messages", "conversations", "conversation")
PAIRS_NAME = "texts"
PROMPT, COMPLETION = "prompt", "completion"
OBJECTS_NAME = "objects"  # ms-swift's grounding column (shardkit.boxes)


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
            with open_location(file) as f:
                yield _open_table(file, f)

    def columns(self, schema: pa.Schema) -> Columns:
        """Which columns make the record, and how (see the module's docstring)."""
        features = _features(schema)
        names = schema.names
        given = {k: self.options.get(f"{k}_column") for k in ("image", "label", "text", "question")}
        for kind, value in given.items():
            if value is not None and value not in names:
                raise InputError(f"{self.location} has no column {value!r} for the {kind}; columns: {', '.join(names)}")
        if not any(given[k] for k in ("label", "text", "question")):
            chat = next((n for n in CHAT_NAMES if n in names), None)
            pairs = PAIRS_NAME if PAIRS_NAME in names else None
            completion = not chat and PROMPT in names and COMPLETION in names
            if chat or pairs or completion:
                images = given["image"] or next((n for n in IMAGES_NAMES if n in names), None)
                objects = OBJECTS_NAME if OBJECTS_NAME in names else None
                return Columns(
                    image=images, chat=chat, pairs=None if chat else pairs, completion=completion, objects=objects
                )
        image = (
            given["image"]
            or next((n for n in names if _feature_type(features.get(n)) == "Image"), None)
            or next((n for n in IMAGE_NAMES if n in names), None)
        )
        label = given["label"] or next((n for n in LABEL_NAMES if n in names), None)
        text = given["text"] or next((n for n in TEXT_NAMES if n in names), None)
        if given["text"]:
            label = given["label"]
        question = given["question"] or next((n for n in QUESTION_NAMES if n in names), None)
        if image is None:
            raise InputError(
                f"{self.location}: no image column found; name it with --image-column ({', '.join(names)})"
            )
        if label is None and text is None:
            raise InputError(f"{self.location}: no label or text column; name one with --label-column or --text-column")
        answer = text or label
        assert answer is not None
        classes = _class_names(features.get(answer))
        return Columns(image=image, answer=answer, question=question, classes=classes, label=text is None)

    def items(self) -> Iterator[RawItem]:
        number = 0
        for schema, batches in self._tables():
            columns = self.columns(schema)
            for batch in batches:
                for row in batch.select(columns.names()).to_pylist():
                    number += 1
                    yield RawItem(number, {"row": row, "columns": columns})

    def count(self) -> int:
        rows = 0
        for file in self.files():
            with open_location(file) as f:
                rows += _num_rows(file, f)
        return rows

    def record(self, item: RawItem) -> Record:
        assert isinstance(item.data, dict)
        row, columns = item.data["row"], item.data["columns"]
        if columns.chat or columns.pairs or columns.completion:
            return self._conversation(row, columns, item.number)
        images = _row_images(row[columns.image], columns.image, item.number)
        reply = _answer(row[columns.answer], columns, item.number)
        question = row[columns.question] if columns.question else None
        prompt = question if isinstance(question, str) and question else self.options.get("prompt") or DEFAULT_PROMPT
        label = {"label": row[columns.answer]} if columns.label else {}
        record = {
            "messages": [
                {"role": "user", "content": [*({"type": "image", "image": i} for i in images), _text(prompt)]},
                {"role": "assistant", "content": reply},
            ],
            "meta": {"row": item.number, **label},
        }
        return validate_record(record, item.number)

    def _conversation(self, row: dict[str, Any], columns: Columns, line: int) -> Record:
        raw = row[columns.image] if columns.image else None
        raw = [] if raw is None else raw if isinstance(raw, list) else [raw]
        images = [
            _image(value, line, f"image {number} of the column {columns.image!r}", number)
            for number, value in enumerate(raw, start=1)
        ]
        if any(i is None for i in images):
            raise RecordError(f"an image of the column {columns.image!r} is empty", "image_missing", line)
        rule = Placeholders.KEEP
        if columns.chat:
            turns = row[columns.chat]
        elif columns.completion:
            turns = prompt_completion_turns(row[PROMPT], row[COMPLETION], line)
            rule = Placeholders.TEXT if isinstance(row[PROMPT], list) else Placeholders.KEEP
        else:
            pairs = row[columns.pairs] or []
            if not all(isinstance(p, dict) for p in pairs):
                raise RecordError(
                    f"{columns.pairs!r} must be a list of {{user, assistant}} pairs", "invalid_record", line
                )
            # no placeholders: the images go before the first question
            turns = [{"role": role, "content": pair.get(role)} for pair in pairs for role in ("user", "assistant")]
        refuse_unsupported({"messages": turns}, line)
        record = {"messages": to_messages(turns, images, line, placeholders=rule), "meta": {"row": line}}
        if columns.objects and row[columns.objects] is not None:
            record["objects"] = _without_nulls(row[columns.objects])
        return refuse_placeholders(validate_record(record, line), line)

    def image_root(self) -> str:
        fs, path = open_fs(self.location)
        return self.location if fs.isdir(path) else parent(self.location)


def _without_nulls(objects: Any) -> Any:
    """A grounding cell without the fields Arrow fills with null where a row lacks them (a struct's missing
    ``bbox_type`` / ``image_id``, or ``point_2d`` next to ``bbox_2d`` in a list of structs)."""
    if isinstance(objects, dict):
        return {k: v for k, v in objects.items() if v is not None}
    if isinstance(objects, list):
        return [_without_nulls(item) if isinstance(item, dict) else item for item in objects]
    return objects


@dataclass(frozen=True)
class Columns:
    """The columns a row is read from: ``chat``, ``pairs`` or ``prompt`` and ``completion`` (``completion``) with
    ``image`` (a list) and, optionally, ``objects`` (grounding), or ``image`` and ``answer``."""

    image: str | None = None
    answer: str | None = None
    question: str | None = None
    classes: list[str] | None = None
    chat: str | None = None
    pairs: str | None = None
    completion: bool = False
    label: bool = False
    objects: str | None = None

    def names(self) -> list[str]:
        """The columns to read, in order."""
        trl = (PROMPT, COMPLETION) if self.completion else ()
        return [c for c in (self.image, self.chat, self.pairs, *trl, self.question, self.answer, self.objects) if c]


def _row_images(value: Any, column: str, row: int) -> list[str]:
    """The images of a row with one answer: its image column's image, or each image of a list (as an ``images``
    column of ``List(Image)`` holds them), in order, to go before the question."""
    cells = value if isinstance(value, list) else [value]
    if not cells:
        raise RecordError(f"the image column {column!r} holds an empty list", "image_missing", row)
    images = [
        _image(cell, row, f"the column {column!r}" if len(cells) == 1 else f"image {n} of the column {column!r}", n)
        for n, cell in enumerate(cells, start=1)
    ]
    if any(image is None for image in images):
        where = "" if len(cells) == 1 else f" (image {images.index(None) + 1} of {len(cells)})"
        raise RecordError(f"the image column {column!r} is empty{where}", "image_missing", row)
    return images  # type: ignore[return-value]


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _image(value: Any, row: int, where: str, number: int = 1) -> str | None:
    """Image ``number`` of a row (``{bytes, path}``, bytes, or a path) as an image reference; None when empty;
    :class:`RecordError` naming ``where`` when the value is not an image (e.g. a list of images).

    Bytes become an :class:`InlineImage` labelled with the row, the number and the file name the cell keeps.
    """
    if isinstance(value, list) or not isinstance(value, dict | bytes | bytearray | str | None):
        what = f"a list of {len(value)} item{'s' * (len(value) != 1)}" if isinstance(value, list) else None
        raise RecordError(
            f"{where} holds {what or 'a ' + type(value).__name__}, not an image (bytes, a path, or {{bytes, path}})",
            "invalid_record",
            row,
        )
    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(data, bytes | bytearray) and data:
        name = value.get("path") if isinstance(value, dict) else None
        about = f"{name}, {len(data)} bytes" if isinstance(name, str) and name else f"{len(data)} bytes"
        return InlineImage(f"inline image {number} of row {row} ({about})", bytes(data))
    if isinstance(value, dict) and value.get("path"):
        return value["path"]  # an Image feature that points to a file instead of holding it
    if isinstance(value, str) and value:
        return value  # a column of image paths
    return None


def _answer(value: Any, columns: Columns, line: int) -> str:
    """The assistant's text: a class name, a string, or the most frequent entry of a list of answers."""
    if isinstance(value, list) and not value:
        raise RecordError(f"the answer column {columns.answer!r} holds an empty list", "invalid_record", line)
    if isinstance(value, list):
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
            raise RecordError(
                f"the answer column {columns.answer!r} holds a list that is not of strings: {str(value)[:80]}",
                "invalid_record",
                line,
            )
        value = Counter(value).most_common(1)[0][0]  # the most frequent; among equals, the first seen
    if columns.classes and isinstance(value, int) and 0 <= value < len(columns.classes):
        value = columns.classes[value]
    if isinstance(value, bytes | dict):
        kind = "binary data" if isinstance(value, bytes) else "an object"
        raise RecordError(
            f"the answer column {columns.answer!r} holds {kind}, not text or a class", "invalid_record", line
        )
    if value is None or str(value) == "":
        raise RecordError("no label or text", "invalid_record", line)
    return str(value)


def _num_rows(file: str, f: Any) -> int:
    batches = _open_table(file, f)[1]
    if file.endswith(".parquet"):
        f.seek(0)
        return pq.ParquetFile(f).metadata.num_rows  # from the footer, nothing decoded
    return sum(batch.num_rows for batch in batches)


def _open_table(file: str, f: Any) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Schema and record batches of a Parquet or Arrow file; :class:`InputError` for any other file."""
    try:
        if file.endswith(".parquet"):
            parquet = pq.ParquetFile(f)
            return parquet.schema_arrow, parquet.iter_batches(batch_size=256)
        if file.endswith(".arrow"):
            return _arrow(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{file} cannot be read as {file.rsplit('.', 1)[-1]}: {exc}") from None
    raise InputError(
        f"{file} is not a Parquet or Arrow file; the hf input form reads .parquet/.arrow files or a save_to_disk "
        "folder (a JSON file is read with --input-format sharegpt, llava or qwen)"
    )


def _arrow(f: Any) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Schema and record batches of an Arrow IPC file, in the stream form ``save_to_disk`` writes or the file form."""
    try:
        stream = pa.ipc.open_stream(f)
        return stream.schema, iter(stream)
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _feature_type(feature: Any) -> str | None:
    """The ``_type`` of a feature; a plain JSON list (the older layout's sequence) is a ``List``."""
    if isinstance(feature, list):
        return "List"
    return feature.get("_type") if isinstance(feature, dict) else None


def _class_names(feature: Any) -> list[str] | None:
    """The class names of a ``ClassLabel`` feature, or of a list of them (both layouts)."""
    if _feature_type(feature) in ("List", "Sequence"):
        feature = feature[0] if isinstance(feature, list) else feature.get("feature")
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return list(names) if isinstance(names, list) else None


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
