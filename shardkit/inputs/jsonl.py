"""JSON-lines inputs: the Qwen2-VL conversation form, and the ShareGPT / LLaMA-Factory form.

Lines are read as bytes, so a line of invalid UTF-8 is one rejected record
rather than a crash; blank lines are skipped. A ShareGPT file may also be one
JSON array (as LLaMA-Factory's ``.json`` datasets are); its entries are then
numbered from 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from shardkit.errors import InputError, RecordError
from shardkit.inputs.base import InputFormat, RawItem, decode_line, open_location, validate_record
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
        return validate_record(decode_line(item), item.line)

    def image_root(self) -> str:
        return parent(self.location)


ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
PLACEHOLDER = "<image>"


class ShareGPT(InputFormat):
    """LLaMA-Factory's multimodal form: ``<image>`` placeholders in the text and a top-level ``images`` list.

    ``{"messages": [{"role": "user", "content": "<image>What is this?"}, ...], "images": ["a.jpg"]}``,
    or with ``"conversations": [{"from": "human", "value": ...}]``; an optional ``"system"`` string. Each
    placeholder takes the next image, in order; their numbers must match.
    """

    name = "sharegpt"

    def items(self) -> Iterator[RawItem]:
        if not is_json_array(self.location):
            yield from iter_lines(self.location)
            return
        with open_location(self.location) as f:
            try:
                entries = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"{self.location} is not a JSON array of records: {exc}") from None
        for number, entry in enumerate(entries, start=1):
            yield RawItem(number, entry if isinstance(entry, dict) else {"__not_an_object__": entry})

    def record(self, item: RawItem) -> Record:
        data: Any = item.data
        if isinstance(data, bytes):
            try:
                data = json.loads(decode_line(item))
            except json.JSONDecodeError as exc:
                raise RecordError(f"invalid JSON: {exc.msg} at column {exc.colno}", "invalid_json", item.line) from None
        if not isinstance(data, dict) or "__not_an_object__" in data:
            raise RecordError("a record must be a JSON object", "invalid_record", item.line)
        return validate_record(self._to_qwen(data, item.line), item.line)

    def _to_qwen(self, data: dict[str, Any], line: int) -> dict[str, Any]:
        turns = data.get("messages", data.get("conversations"))
        if not isinstance(turns, list):
            raise RecordError("missing 'messages' (or 'conversations') list", "invalid_record", line)
        images = data.get("images", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise RecordError("'images' must be a list of image paths", "invalid_record", line)
        messages: list[dict[str, Any]] = []
        if isinstance(data.get("system"), str) and data["system"]:
            messages.append({"role": "system", "content": data["system"]})
        remaining = iter(images)
        placeholders = 0
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError(f"messages[{i}] is not an object", "invalid_record", line)
            found = turn.get("role", turn.get("from"))
            role = ROLES.get(found) if isinstance(found, str) else None
            text = turn.get("content", turn.get("value"))
            if role is None:
                raise RecordError(f"messages[{i}]: unsupported role {found!r}", "invalid_record", line)
            if not isinstance(text, str):
                raise RecordError(f"messages[{i}]: content must be a string", "invalid_record", line)
            parts: list[dict[str, Any]] = []
            for j, piece in enumerate(re.split(re.escape(PLACEHOLDER), text)):
                if j:
                    placeholders += 1
                    image = next(remaining, None)
                    if image is None:
                        break
                    parts.append({"type": "image", "image": image})
                if piece:
                    parts.append({"type": "text", "text": piece})
            messages.append({"role": role, "content": parts})
        if placeholders != len(images):
            raise RecordError(
                f"{placeholders} {PLACEHOLDER} placeholders but {len(images)} images", "invalid_record", line
            )
        out: dict[str, Any] = {"messages": messages}
        extra = {k: v for k, v in data.items() if k not in ("messages", "conversations", "images", "system")}
        if extra:
            out["meta"] = extra
        return out

    def image_root(self) -> str:
        return parent(self.location)
