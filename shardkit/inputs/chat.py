"""Chat turns in the ShareGPT / LLaVA / Hugging Face shapes, turned into the Qwen form's messages.

A turn is ``{"role": ..., "content": ...}`` or ``{"from": ..., "value": ...}``
(roles ``user``/``human``, ``assistant``/``gpt``, ``system``). Its content is a
string in which each ``<image>`` placeholder takes the next image of the
record's list, or a list of parts where an ``image`` part without an image of
its own (Hugging Face's ``{"type": "image", "index": 0}``) takes the next one.
The text around a placeholder is kept as it is, as LLaMA-Factory does. The
number of placeholders must equal the number of images; a conversation with
images and no placeholder at all has them before the first user message's
text (LLaMA-Factory's rule, which its ``mllm_demo.json`` relies on).
"""

from __future__ import annotations

from typing import Any

from shardkit.errors import RecordError

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
PLACEHOLDER = "<image>"


def to_messages(turns: Any, images: list[Any], line: int, *, system: Any = None) -> list[dict[str, Any]]:
    """The Qwen form's messages for ``turns`` with ``images`` (paths, URIs or ``{bytes, path}``) in order."""
    if not isinstance(turns, list):
        raise RecordError("missing 'messages' (or 'conversations') list", "invalid_record", line)
    slots = sum(_count_slots(turn) for turn in turns)
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
        if isinstance(content, str):
            parts = _split(content, remaining)
        elif isinstance(content, list):
            parts = [piece for part in content for piece in _part(part, remaining)]
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
                out[i] = {**turn, key: PLACEHOLDER * count + content}
            elif isinstance(content, list):
                out[i] = {**turn, key: [{"type": "image"}] * count + content}
            return out
    return out


def _count_slots(turn: Any) -> int:
    content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
    if isinstance(content, str):
        return content.count(PLACEHOLDER)
    if isinstance(content, list):
        return sum(1 if _is_slot(part) else _text(part).count(PLACEHOLDER) for part in content)
    return 0


def _is_slot(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image" and part.get("image") is None


def _text(part: Any) -> str:
    is_text = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    return part["text"] if is_text else ""


def _split(text: str, images: Any) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for j, piece in enumerate(text.split(PLACEHOLDER)):
        if j:
            parts.append({"type": "image", "image": next(images)})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _part(part: Any, images: Any) -> list[Any]:
    if _is_slot(part):
        return [{"type": "image", "image": next(images)}]
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str | None):
        return _split(part.get("text") or "", images)  # drops Hugging Face's "index": null
    return [part]
