"""What every input form shares: raw items with their number, and turning one into a validated record."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import ValidationError

from shardkit.errors import InputError, RecordError
from shardkit.schema import NO_ANSWER, Record, format_validation_error
from shardkit.storage import hash_stream, open_fs


@dataclass(frozen=True)
class RawItem:
    """One input record before validation: its 1-based ``number`` in the input (a line of JSONL, an entry of
    labels.json, a record of a JSON array, a row of a table: what rejects call its "line") and its raw data.

    ``data`` is the line's bytes for JSON lines, or a dict for entries of
    other forms (image bytes included). ``source_line`` is the line a record
    of a JSON array starts on. ``duplicate_of`` is set by ``--dedup``.
    """

    number: int
    data: bytes | dict[str, Any]
    duplicate_of: int | None = None
    source_line: int | None = None

    def digest(self) -> bytes:
        """sha256 of the item's content (image bytes included where the item holds them)."""
        if isinstance(self.data, bytes):
            return hashlib.sha256(self.data.rstrip(b"\r\n")).digest()
        return hashlib.sha256(json.dumps(self.data, sort_keys=True, default=_bytes_digest).encode()).digest()


def _bytes_digest(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot hash {type(value).__name__}")


class InputFormat(ABC):
    """One form of input: enumerates raw items (streaming) and turns each into a :class:`Record`.

    Instances are small and picklable: workers rebuild records from raw items.
    """

    name: ClassVar[str]
    #: how the items are counted in messages ("line", "entry", "row")
    unit: ClassVar[str] = "line"

    def __init__(self, location: str, **options: Any):
        self.location = location
        self.options = options

    @abstractmethod
    def items(self) -> Iterator[RawItem]:
        """The raw items, in input order."""

    @abstractmethod
    def record(self, item: RawItem) -> Record:
        """The validated record of ``item``; :class:`RecordError` (with the item's number) when it is invalid."""

    @abstractmethod
    def image_root(self) -> str:
        """The folder image paths are relative to, unless ``--image-root`` says otherwise."""

    def unit_of(self, item: RawItem) -> str:
        """How ``item`` is counted in messages (:attr:`unit`; a form whose numbering depends on the file may tell
        from the item alone, without reading the file)."""
        return self.unit

    def count(self) -> int:
        """How many items the input holds (a pass over them, unless the form knows a cheaper way)."""
        return sum(1 for _ in self.items())

    def files(self) -> list[str]:
        """The files whose bytes make up the input."""
        return [self.location]


def hash_files(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open_location(path) as f:
            hash_stream(f, digest)
    return digest.hexdigest()


def open_location(path: str):
    """Open an input file (local or fsspec URL) with a clear :class:`InputError` when it cannot be."""
    try:
        fs, location = open_fs(path)
        return fs.open(location, "rb")
    except FileNotFoundError:
        raise InputError(f"input not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"input is a folder, not a file: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from None


def validate_record(data: dict[str, Any] | str | bytes, line: int) -> Record:
    """Validate a record given as a dict or JSON text; :class:`RecordError` with a plain reason.

    Audio, ``video_url`` parts and preference-pair records are refused with their own codes
    (see :func:`refuse_unsupported`), never built as text-only samples.
    """
    try:
        if isinstance(data, dict):
            record = Record.model_validate(data)
        else:
            record = Record.model_validate_json(data)
    except ValidationError as exc:
        kind = exc.errors()[0]["type"]
        code = {"json_invalid": "invalid_json", NO_ANSWER: NO_ANSWER}.get(kind, "invalid_record")
        if code != "invalid_json":
            refuse_unsupported(data if isinstance(data, dict) else json.loads(data), line, video=True)
        raise RecordError(format_validation_error(exc), code, line) from None
    return record


#: top-level keys that carry another modality, and which (its reject code is "<modality>_not_supported");
#: the forms that read videos (``video=True``) take the video keys themselves
MEDIA_KEYS = {
    "videos": "video",
    "video": "video",
    "audios": "audio",
    "audio": "audio",
}
#: content part types of another modality, and which (``video`` parts are read where a form takes videos)
MEDIA_PARTS = {
    "video": "video",
    "video_url": "video",
    "audio": "audio",
    "audio_url": "audio",
    "input_audio": "audio",
}
#: keys of preference (DPO / KTO) records: ms-swift's, LLaMA-Factory's and TRL's
PREFERENCE_KEYS = ("rejected_response", "rejected_messages", "rejected_images", "chosen", "rejected", "kto_tag")
PLACEHOLDERS = {"<video>": "video", "<audio>": "audio"}


def refuse_unsupported(data: Any, line: int, *, video: bool = False) -> None:
    """:class:`RecordError` when ``data`` (one raw record) holds audio, a preference pair, or a video its form
    does not read (``video``: the form reads ``videos``/``video`` keys and ``video`` parts).

    shardkit builds supervised image, video and text samples; such a record
    would otherwise lose its media or its rejected answer silently.
    """
    if not isinstance(data, dict):
        return
    for key, modality in MEDIA_KEYS.items():
        if data.get(key) and not (video and modality == "video"):
            reason = f"the record has {modality} ({key!r}); {_TAKES[modality]}"
            raise RecordError(reason, f"{modality}_not_supported", line)
    for key in PREFERENCE_KEYS:
        if key in data:
            raise RecordError(
                f"a preference pair ({key!r}): shardkit builds supervised samples only, not DPO/KTO pairs",
                "preference_pair",
                line,
            )
    turns = data.get("messages", data.get("conversations"))
    for i, turn in enumerate(turns if isinstance(turns, list) else []):
        content = turn.get("content") if isinstance(turn, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PARTS and not (video and kind == "video"):
                modality = MEDIA_PARTS[kind]
                how = ' (give a video as {"type": "video", "video": path})' if kind == "video_url" else ""
                raise RecordError(
                    f"messages[{i}] has a {kind!r} part{how}; {_TAKES[modality]}", f"{modality}_not_supported", line
                )


#: what shardkit reads of each modality, for the reasons above
_TAKES = {
    "audio": "shardkit builds image, video and text samples, never audio",
    "video": "videos are read in the qwen ('video' parts), sharegpt ('videos' and <video>) and llava ('video') forms "
    "only",
}


def refuse_placeholders(record: Record, line: int, *, video: bool = False) -> Record:
    """``record``, or :class:`RecordError` when a text holds an ``<audio>`` placeholder, or a ``<video>`` one
    where the form reads no videos (``video=False``).

    For the forms where these strings are placeholders (ShareGPT, LLaVA, Hugging Face conversations);
    in the Qwen form they are plain text.
    """
    for i, message in enumerate(record.messages):
        for part in message.content:
            text = getattr(part, "text", "")
            for placeholder, modality in PLACEHOLDERS.items():
                if placeholder in text and not (video and modality == "video"):
                    raise RecordError(
                        f"messages[{i}] has a {placeholder} placeholder; {_TAKES[modality]}",
                        f"{modality}_not_supported",
                        line,
                    )
    return record


def decode_line(item: RawItem) -> str:
    """A JSON line's text; :class:`RecordError` for invalid UTF-8 (:class:`InputError` if ``item`` is not a line)."""
    if not isinstance(item.data, bytes):
        raise InputError(f"item {item.number} is not a JSON line but {type(item.data).__name__}")
    try:
        return item.data.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            f"not valid UTF-8 (byte 0x{item.data[exc.start]:02x} at column {exc.start + 1})",
            "invalid_utf8",
            item.number,
        ) from None
