"""What every input form shares: raw items with their number, and turning one into a validated record."""

from __future__ import annotations

import base64
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import ValidationError

from shardkit.errors import InputError, RecordError
from shardkit.schema import Record, format_validation_error
from shardkit.storage import hash_stream, open_fs


@dataclass(frozen=True)
class RawItem:
    """One input record before validation: its 1-based number (line, entry or row) and its raw data.

    ``data`` is the line's bytes for JSON lines, or a dict for entries of
    other forms (image bytes included). ``duplicate_of`` is set by ``--dedup``.
    """

    line: int
    data: bytes | dict[str, Any]
    duplicate_of: int | None = None

    def digest(self) -> bytes:
        """sha256 of the item's content (image bytes included where the item holds them)."""
        if isinstance(self.data, bytes):
            return hashlib.sha256(self.data.rstrip(b"\r\n")).digest()
        return hashlib.sha256(json.dumps(self.data, sort_keys=True, default=_bytes_digest).encode()).digest()


def _bytes_digest(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot hash {type(value).__name__}")


def data_uri(data: bytes) -> str:
    """Image bytes as a ``data:`` URI, the form records carry inline images in."""
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


@dataclass(frozen=True)
class InputSummary:
    """How many items the input holds, and the sha256 of its files."""

    records: int
    sha256: str


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

    def summary(self) -> InputSummary:
        """Count the items and hash the input (one streaming pass)."""
        return InputSummary(sum(1 for _ in self.items()), hash_files(self.files()))

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
    """Validate a record given as a dict or JSON text; :class:`RecordError` with a plain reason."""
    try:
        if isinstance(data, dict):
            return Record.model_validate(data)
        return Record.model_validate_json(data)
    except ValidationError as exc:
        code = "invalid_json" if exc.errors()[0]["type"] == "json_invalid" else "invalid_record"
        raise RecordError(format_validation_error(exc), code, line) from None


def decode_line(item: RawItem) -> str:
    """A JSON line's text; :class:`RecordError` for invalid UTF-8."""
    assert isinstance(item.data, bytes)
    try:
        return item.data.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            f"not valid UTF-8 (byte 0x{item.data[exc.start]:02x} at column {exc.start + 1})", "invalid_utf8", item.line
        ) from None
