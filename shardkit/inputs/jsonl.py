"""JSON inputs: the Qwen2-VL conversation form, the ShareGPT / LLaMA-Factory form and the LLaVA form.

Lines are read as bytes, so a line of invalid UTF-8 is one rejected record
rather than a crash; blank lines are skipped. A ShareGPT or LLaVA file may
also be one JSON array (as LLaMA-Factory's and LLaVA's ``.json`` files are);
its entries are then records numbered from 1, each with the line it starts on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any, ClassVar

from shardkit.errors import InputError, RecordError
from shardkit.inputs.base import (
    InputFormat,
    RawItem,
    decode_line,
    open_location,
    refuse_placeholders,
    refuse_unsupported,
    validate_record,
)
from shardkit.inputs.chat import to_messages
from shardkit.schema import Record
from shardkit.storage import parent


def iter_lines(path: str) -> Iterator[RawItem]:
    """The non-blank lines of ``path`` with their 1-based numbers, streaming."""
    with open_location(path) as f:
        for number, data in enumerate(f, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]  # a UTF-8 byte order mark
            if data.strip():
                yield RawItem(number, data)


def is_json_array(path: str) -> bool:
    """Whether the file holds one JSON array (rather than JSON lines)."""
    with open_location(path) as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"[")


class QwenJsonl(InputFormat):
    """``{"messages": [{"role": ..., "content": str | [{"type": "image" | "text", ...}]}], "meta": {...}}`` per line."""

    name = "qwen"

    def items(self) -> Iterator[RawItem]:
        return iter_lines(self.location)

    def record(self, item: RawItem) -> Record:
        return validate_record(decode_line(item), item.number)

    def image_root(self) -> str:
        return parent(self.location)


class ShareGPT(InputFormat):
    """LLaMA-Factory's multimodal form: ``<image>`` placeholders in the text and a top-level ``images`` list.

    ``{"messages": [{"role": "user", "content": "<image>What is this?"}, ...], "images": ["a.jpg"]}``,
    or with ``"conversations": [{"from": "human", "value": ...}]``; an optional ``"system"`` string, ``"id"``
    and ``"meta"`` object; a message's ``"loss": true|false`` (ms-swift) says whether it is trained. Each
    placeholder takes the next image, in order; their numbers must match. Other top-level keys that hold
    data are refused (``unknown_key``) unless named in ``keep_keys``, which keeps them in ``meta``.
    """

    name = "sharegpt"
    #: the top-level key of the images
    image_key: ClassVar[str] = "images"
    #: top-level keys read as the record
    known: ClassVar[frozenset[str]] = frozenset({"messages", "conversations", "images", "system", "id", "meta"})

    @functools.cached_property
    def is_array(self) -> bool:
        """Whether the input is one JSON array (its entries are then records, numbered from 1)."""
        return is_json_array(self.location)

    @property
    def unit(self) -> str:  # type: ignore[override]
        return "record" if self.is_array else "line"

    def items(self) -> Iterator[RawItem]:
        return iter_array(self.location) if self.is_array else iter_lines(self.location)

    def record(self, item: RawItem) -> Record:
        data: Any = item.data
        if isinstance(data, bytes):
            try:
                data = json.loads(decode_line(item))
            except json.JSONDecodeError as exc:
                raise RecordError(
                    f"invalid JSON: {exc.msg} at column {exc.colno}", "invalid_json", item.number
                ) from None
        if not isinstance(data, dict) or NOT_AN_OBJECT in data:
            raise RecordError("a record must be a JSON object", "invalid_record", item.number)
        refuse_unsupported(data, item.number)
        return refuse_placeholders(validate_record(self.to_qwen(data, item.number), item.number), item.number)

    def to_qwen(self, data: dict[str, Any], line: int) -> dict[str, Any]:
        """The record in the Qwen form."""
        images = data.get(self.image_key) or []
        images = [images] if isinstance(images, str | dict) else images
        if not isinstance(images, list) or not all(isinstance(i, str | dict) for i in images):
            raise RecordError(f"{self.image_key!r} must be a list of image paths", "invalid_record", line)
        # ms-swift's {"path": ...}; {"bytes": "<base64>"} is read by the schema
        images = [i["path"] if isinstance(i, dict) and not i.get("bytes") and i.get("path") else i for i in images]
        if not isinstance(data.get("meta") or {}, dict):
            raise RecordError("'meta' must be an object", "invalid_record", line)
        meta = dict(data.get("meta") or {})
        keep = set(self.options.get("keep_keys") or ())
        for key, value in data.items():
            if key in self.known or value in (None, "", [], {}):
                continue
            if key in OTHER_FORM:
                raise RecordError(
                    f"{key!r} is not read in the {self.name} form: use --input-format {OTHER_FORM[key]}",
                    "unknown_key",
                    line,
                )
            if key not in keep:
                raise RecordError(
                    f"unknown top-level key {key!r} holds data that would be lost; keep it in meta with "
                    f"--keep-keys {key}, or remove it",
                    "unknown_key",
                    line,
                )
            meta[key] = value
        turns = data.get("messages", data.get("conversations"))
        out: dict[str, Any] = {"messages": to_messages(turns, images, line, system=data.get("system"))}
        if meta:
            out["meta"] = meta
        if data.get("id") is not None:
            out["id"] = data["id"]  # the schema checks its type
        return out

    def image_root(self) -> str:
        return parent(self.location)


class Llava(ShareGPT):
    """The LLaVA / InternVL / Qwen2-VL-Finetune form: ``image`` (a path or a list) and ``conversations``.

    ``{"id": "1", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
    {"from": "gpt", "value": "A cat."}]}``, one per line or a JSON array; InternVL's image sizes (``width`` and
    ``height``, or ``width_list`` and ``height_list`` for several images) are ignored: the images' own sizes are
    read. Otherwise as :class:`ShareGPT`.
    """

    name = "llava"
    image_key = "image"
    known = frozenset(
        {"id", "image", "conversations", "messages", "system", "meta", "width", "height", "width_list", "height_list"}
    )


NOT_AN_OBJECT = "__not_an_object__"
OTHER_FORM = {"image": "llava", "images": "sharegpt"}  # the image key of the other placeholder form


def iter_array(path: str) -> Iterator[RawItem]:
    """The entries of a JSON array file, numbered from 1, each with the line it starts on."""
    with open_location(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not valid UTF-8 (byte {exc.start})") from None
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0) + 1  # past the "["
    line, counted, number = 1, 0, 0
    while True:
        pos = _skip_space(text, pos)
        if text.startswith("]", pos) and number == 0:
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not a JSON array of records: {exc.msg} at line {exc.lineno}") from None
        line += text.count("\n", counted, pos)
        counted = pos
        number += 1
        yield RawItem(number, value if isinstance(value, dict) else {NOT_AN_OBJECT: value}, source_line=line)
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith("]", pos):
            return
        else:
            line += text.count("\n", counted, pos)
            raise InputError(f"{path} is not a JSON array of records: expected ',' or ']' at line {line}")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
