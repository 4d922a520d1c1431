"""Checks a record passes before it is converted, each failure a :class:`RecordError` with a plain reason.

- ``meta`` (and ``id``) must become valid JSON (:func:`plain_json`): NaN and
  +-Infinity become ``null`` (JSON has neither; pandas writes NaN for a missing
  value), ``Decimal`` a float, dates and times ISO 8601 text, numpy scalars
  and arrays plain numbers and lists; binary values and other types are
  rejected (``invalid_meta``).
- Text must be valid Unicode: a lone surrogate such as ``"\\udc80"`` is
  rejected (``invalid_text``).
- A trained assistant reply must have text: ``""`` would train only the end
  token (``empty_answer``).
- Text is length-checked before it is tokenized (:func:`min_tokens`), so an
  unbounded line is rejected in bounded time and memory (``too_long``).
"""

from __future__ import annotations

import datetime
import decimal
import math
from typing import Any

import numpy as np

from shardkit.errors import RecordError
from shardkit.render import TrainOn, targets
from shardkit.schema import Record, TextPart
from shardkit.tokenizer import FastTokenizer, longest_token

#: Unicode normalization (NFC, which the Qwen tokenizer applies) shrinks a text to no less than a third of its
#: code points (three Hangul jamo compose into one syllable).
NFC_SHRINK = 3


def plain_json(value: Any, where: str = "meta") -> Any:
    """``value`` as JSON-ready data by the module's rule; :class:`RecordError` naming ``where`` otherwise."""
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str):
            check_unicode(value, where)
        return value
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise RecordError(f"{where} has a key of type {type(key).__name__}", "invalid_meta")
            out[plain_json(key, where) if isinstance(key, str) else key] = plain_json(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple | np.ndarray):
        return [plain_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, bytes | bytearray | memoryview):
        raise RecordError(f"{where} is binary data ({len(value)} bytes), which JSON cannot hold", "invalid_meta")
    raise RecordError(f"{where} is a {type(value).__name__}, which JSON cannot hold", "invalid_meta")


def check_unicode(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates cannot be stored as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(
            f"{where} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start}",
            "invalid_text",
        ) from None


def check_text(record: Record) -> None:
    """Every text part valid Unicode (the family's reserved tokens are the renderer's check)."""
    for i, message in enumerate(record.messages):
        for part in message.content:
            if isinstance(part, TextPart):
                check_unicode(part.text, f"messages[{i}] text")


def check_answers(record: Record, train_on: TrainOn) -> None:
    """Refuse a trained assistant reply with no text (it would train only ``<|im_end|>``)."""
    for i, (message, target) in enumerate(zip(record.messages, targets(record, train_on), strict=True)):
        if message.role == "assistant" and target:
            if not any(isinstance(p, TextPart) and p.text.strip() for p in message.content):
                raise RecordError(f"messages[{i}] (assistant) is empty: nothing to train on", "empty_answer")


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` can stand for (byte-level BPE: a character per byte)."""
    if isinstance(tokenizer, FastTokenizer):
        return tokenizer.max_token_chars
    return longest_token(getattr(tokenizer, "backend_tokenizer", tokenizer))


def text_chars(record: Record) -> int:
    """Characters of text in the record."""
    return sum(len(p.text) for m in record.messages for p in m.content if isinstance(p, TextPart))


def min_tokens(chars: int, token_chars: int) -> int:
    """A sound lower bound on the tokens of ``chars`` characters: no token stands for more than ``token_chars``
    characters, and normalization shrinks a text by at most :data:`NFC_SHRINK`."""
    return chars // (NFC_SHRINK * token_chars)
