"""Reading the input JSONL (a local file or an fsspec URL): raw lines with their 1-based numbers, then records.

Lines are read as bytes, so a line of invalid UTF-8 is one rejected record
rather than a crash; blank lines are skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from shardkit.errors import InputError, RecordError
from shardkit.schema import Record, format_validation_error
from shardkit.storage import open_input


@dataclass(frozen=True)
class RawLine:
    """One non-blank input line: its 1-based number and its bytes."""

    line: int
    data: bytes


@dataclass(frozen=True)
class InputSummary:
    """Non-blank lines and the sha256 of the whole input file."""

    records: int
    sha256: str


def _open(path: str | Path):
    try:
        return open_input(str(path))
    except FileNotFoundError:
        raise InputError(f"input not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"input is a folder, not a JSONL file: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from None


def iter_raw_lines(path: str | Path) -> Iterator[RawLine]:
    """Yield the non-blank lines of ``path``, streaming."""
    with _open(path) as f:
        for number, data in enumerate(f, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]  # a UTF-8 byte order mark
            if data.strip():
                yield RawLine(number, data)


def summarize_input(path: str | Path) -> InputSummary:
    """Count non-blank lines and hash the file, in one streaming pass."""
    digest = hashlib.sha256()
    records = 0
    with _open(path) as f:
        for data in f:
            digest.update(data)
            records += bool(data.strip())
    return InputSummary(records, digest.hexdigest())


def parse_record(raw: RawLine) -> Record:
    """Decode and validate one line; a :class:`RecordError` carries its line number and reason."""
    try:
        text = raw.data.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            f"not valid UTF-8 (byte 0x{raw.data[exc.start]:02x} at column {exc.start + 1})", "invalid_utf8", raw.line
        ) from None
    try:
        return Record.model_validate_json(text)
    except ValidationError as exc:
        code = "invalid_json" if exc.errors()[0]["type"] == "json_invalid" else "invalid_record"
        raise RecordError(format_validation_error(exc), code, raw.line) from None
