"""Chat turns in the shapes other projects write, turned into the Qwen form's messages.

A turn is ``{"role": ..., "content": ...}`` or ``{"from": ..., "value": ...}``
(roles ``user``/``human``, ``assistant``/``gpt``, ``system``). Its content is a
string or a list of parts, where an ``image`` part without an image of its own
(Hugging Face's ``{"type": "image", "index": 0}``) takes the next image of the
record's list.

In a string, each ``<image>`` placeholder takes the next image, by the rule of
the project the form comes from (:class:`Placeholders`). The number of
placeholders must equal the number of images; a conversation with images and
no placeholder at all has them before the first user message's text (the rule
of LLaMA-Factory and ms-swift, which LLaMA-Factory's ``mllm_demo.json``
relies on).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from shardkit.errors import RecordError

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
PLACEHOLDER = "<image>"


class Placeholders(StrEnum):
    """How ``<image>`` in a string content is read."""

    KEEP = "keep"
    """A placeholder; the text around it is kept as it is (LLaMA-Factory, ms-swift, InternVL):
    ``"<image>\\nWhat?"`` is the image, then ``"\\nWhat?"``."""
    STRIP = "strip"
    """A placeholder; in a user turn, each piece of text around the placeholders is stripped of surrounding
    whitespace and blank pieces dropped, as Qwen's finetune (``qwen-vl-finetune``, ``_build_messages``) reads
    LLaVA-style text: ``"<image>\\nWhat?"`` is the image, then ``"What?"``."""
    TEXT = "text"
    """Plain text (TRL: images are ``{"type": "image"}`` parts, or go before the first user text)."""


def to_messages(
    turns: Any,
    images: list[Any],
    line: int,
    *,
    system: Any = None,
    placeholders: Placeholders = Placeholders.KEEP,
) -> list[dict[str, Any]]:
    """The Qwen form's messages for ``turns`` with ``images`` (paths, URIs or ``{bytes, path}``) in order."""
    if not isinstance(turns, list):
        raise RecordError("missing 'messages' (or 'conversations') list", "invalid_record", line)
    slots = sum(_count_slots(turn, placeholders) for turn in turns)
    if slots == 0 and images:
        turns = _images_first(turns, len(images))
        slots = len(images)
    if slots != len(images):
        raise RecordError(f"{slots} {PLACEHOLDER} placeholders but {len(images)} images", "invalid_record", line)
    remaining = iter(images)
    messages: list[dict[str, Any]] = []
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"messages[{i}] is not an object", "invalid_record", line)
        found = turn.get("role", turn.get("from"))
        role = ROLES.get(found) if isinstance(found, str) else None
        if role is None:
            raise RecordError(f"messages[{i}]: unsupported role {found!r}", "invalid_record", line)
        content = turn.get("content", turn.get("value"))
        rule = Placeholders.KEEP if placeholders is Placeholders.STRIP and role != "user" else placeholders
        if isinstance(content, str):
            parts = _text_parts(content, remaining, rule)
        elif isinstance(content, list):
            parts = [piece for part in content for piece in _part(part, remaining, rule)]
        else:
            raise RecordError(f"messages[{i}]: content must be a string or a list of parts", "invalid_record", line)
        message: dict[str, Any] = {"role": role, "content": parts}
        if "loss" in turn and turn["loss"] is not None:
            message["loss"] = turn["loss"]
        messages.append(message)
    return messages


def _images_first(turns: list[Any], count: int) -> list[Any]:
    """With no placeholder at all, the images go before the first user message's text (as LLaMA-Factory does)."""
    out = list(turns)
    for i, turn in enumerate(out):
        if isinstance(turn, dict) and ROLES.get(turn.get("role", turn.get("from"))) == "user":
            key = "content" if "content" in turn else "value"
            content = turn.get(key)
            if isinstance(content, str):
                out[i] = {**turn, key: [{"type": "image"}] * count + [_text_part(content)]}
            elif isinstance(content, list):
                out[i] = {**turn, key: [{"type": "image"}] * count + content}
            return out
    return out


def _count_slots(turn: Any, placeholders: Placeholders) -> int:
    content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
    counted = placeholders is not Placeholders.TEXT
    if isinstance(content, str):
        return content.count(PLACEHOLDER) if counted else 0
    if isinstance(content, list):
        return sum(1 if _is_slot(part) else _text(part).count(PLACEHOLDER) if counted else 0 for part in content)
    return 0


def _is_slot(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image" and part.get("image") is None


def _text(part: Any) -> str:
    is_text = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    return part["text"] if is_text else ""


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _text_parts(text: str, images: Any, rule: Placeholders) -> list[dict[str, Any]]:
    """A string's parts under ``rule``: text, and an image for each placeholder."""
    if rule is Placeholders.TEXT:
        return [_text_part(text)] if text else []
    parts: list[dict[str, Any]] = []
    for j, piece in enumerate(text.split(PLACEHOLDER)):
        if j:
            parts.append({"type": "image", "image": next(images)})
        if rule is Placeholders.STRIP:
            piece = piece.strip()
        if piece:
            parts.append(_text_part(piece))
    return parts


def _part(part: Any, images: Any, rule: Placeholders) -> list[Any]:
    if _is_slot(part):
        return [{"type": "image", "image": next(images)}]
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str | None):
        return _text_parts(part.get("text") or "", images, rule)  # drops Hugging Face's "index": null
    return [part]
