"""Chat turns in the shapes other projects write, turned into the Qwen form's messages.

A turn is ``{"role": ..., "content": ...}`` or ``{"from": ..., "value": ...}``
(roles ``user``/``human``, ``assistant``/``gpt``/``bot``, ``system``), or
ms-swift's pair ``{"human": ..., "assistant": ...}`` (a user turn and its
answer). Its content is a string or a list of parts, where an ``image`` part
without an image of its own (Hugging Face's ``{"type": "image", "index": 0}``)
takes the next image of the record's list. The other shapes become such turns
first: TRL's ``prompt`` and ``completion`` (:func:`prompt_completion_turns`),
ms-swift's ``query``, ``response`` and ``history`` (:func:`query_response_turns`)
and LLaMA-Factory v1's messages (:func:`lf_v1_messages`).

In a string, each ``<image>`` placeholder takes the next image, by the rule of
the project the form comes from (:class:`Placeholders`). The number of
placeholders must equal the number of images; a conversation with images and
no placeholder at all has them before the first user message's text (the rule
of LLaMA-Factory, ms-swift and TRL, which LLaMA-Factory's ``mllm_demo.json``
relies on). Where a form reads videos, ``<video>`` and the record's videos
(a clip's path, or a list of frame images) follow the same rules, the videos
after the images when both go first.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from shardkit.errors import RecordError

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "system": "system",
}
PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
PAIR_USER = ("human", "user")
PAIR_ASSISTANT = ("assistant", "gpt", "bot")


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
    videos: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """The Qwen form's messages for ``turns`` with ``images`` (paths, URIs or ``{bytes, path}``) in order, and
    ``videos`` (paths, or lists of frame images) where the form reads them (None: ``<video>`` stays text, for the
    caller to refuse)."""
    if not isinstance(turns, list):
        raise RecordError("missing 'messages' (or 'conversations') list", "invalid_record", line)
    turns = [t for turn in turns for t in _unpair(turn)]
    media = {"image": images} if videos is None else {"image": images, "video": videos}
    first: dict[str, int] = {}
    for kind, items in media.items():
        slots = sum(_count_slots(turn, placeholders, kind) for turn in turns)
        if slots == 0 and items:
            first[kind] = len(items)
        elif slots != len(items):
            raise RecordError(
                f"{slots} {PLACEHOLDERS[kind]} placeholders but {len(items)} {kind}s", "invalid_record", line
            )
    if first:
        turns = _media_first(turns, first)
    remaining = {kind: iter(items) for kind, items in media.items()}
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


#: each kind of media's placeholder in a string
PLACEHOLDERS = {"image": PLACEHOLDER, "video": VIDEO_PLACEHOLDER}


def prompt_completion_turns(prompt: Any, completion: Any, line: int) -> list[Any]:
    """TRL's prompt-completion record as turns: each a list of messages (the conversational form) or a string (one
    user turn, one assistant answer). The prompt's assistant turns are context, not targets (TRL trains the
    completion only); a prompt without a completion (TRL's prompt-only form, for GRPO) is ``no_answer``."""
    if completion in (None, "", []):
        raise RecordError(
            "a 'prompt' without a 'completion' (TRL's prompt-only form, for GRPO and other online methods): nothing "
            "to train on; give the answer in 'completion'",
            "no_answer",
            line,
        )
    before = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    after = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    if not isinstance(before, list) or not isinstance(after, list):
        raise RecordError("'prompt' and 'completion' must be strings or lists of messages", "invalid_record", line)
    context = [_not_trained(turn) for turn in before]
    return context + after


def _not_trained(turn: Any) -> Any:
    if isinstance(turn, dict) and ROLES.get(turn.get("role")) == "assistant" and turn.get("loss") is None:
        return {**turn, "loss": False}
    return turn


def query_response_turns(query: Any, response: Any, history: Any, line: int) -> list[dict[str, Any]]:
    """ms-swift's query-response record as turns: ``history`` (``[[query, response], ...]``), then ``query`` and
    its ``response``; a query without a response is ``no_answer``."""
    if response in (None, ""):
        raise RecordError(
            "a 'query' without a 'response' (a prompt-only record, as for GRPO): nothing to train on; give the answer "
            "in 'response'",
            "no_answer",
            line,
        )
    history = [] if history is None else history
    pairs = history if isinstance(history, list) else None
    if pairs is None or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise RecordError("'history' must be a list of [query, response] pairs", "invalid_record", line)
    if not isinstance(query, str) or not isinstance(response, str):
        raise RecordError("'query' and 'response' must be strings", "invalid_record", line)
    turns = []
    for user, assistant in [*pairs, (query, response)]:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return turns


#: LLaMA-Factory v1 content types and what they become (video and audio parts are refused before)
LF_V1_PARTS = {"text": "text", "image_url": "image"}


def lf_v1_messages(messages: Any, line: int) -> list[dict[str, Any]]:
    """LLaMA-Factory v1's messages (parts ``{"type": "text" | "image_url", "value": ...}``, a per-message
    ``loss_weight``) as the Qwen form's. LLaMA-Factory trains the assistant turns whose ``loss_weight`` is above 0
    (default 1) and never the others: an assistant's explicit weight of 0 or 1 becomes its ``loss``; other
    weights are refused, since shardkit weighs a turn wholly or not at all."""
    if not isinstance(messages, list):
        raise RecordError("missing 'messages' list", "invalid_record", line)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{i}] is not an object", "invalid_record", line)
        message = dict(message)
        weight = message.pop("loss_weight", None)
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [_lf_v1_part(part, i, line) for part in content]
        if message.get("role") == "assistant" and weight is not None:
            if weight not in (0, 1) or isinstance(weight, bool):
                raise RecordError(
                    f"messages[{i}] has loss_weight {weight!r}: shardkit trains a turn wholly or not at all; use 0 "
                    "or 1",
                    "invalid_record",
                    line,
                )
            message["loss"] = weight == 1
        out.append(message)
    return out


def _lf_v1_part(part: Any, index: int, line: int) -> Any:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in LF_V1_PARTS and set(part) == {"type", "value"}:
        new = LF_V1_PARTS[kind]
        return {"type": new, new: part["value"]}
    if kind in ("reasoning", "tool_call"):
        raise RecordError(
            f"messages[{index}] has a {kind!r} part: the chat formats shardkit renders have no place for it; remove "
            "the part",
            "invalid_record",
            line,
        )
    return part


def _unpair(turn: Any) -> list[Any]:
    """ms-swift's ``{"human": q, "assistant": a}`` as two turns; any other turn as it is."""
    if not isinstance(turn, dict) or "role" in turn or "from" in turn:
        return [turn]
    user = next((k for k in PAIR_USER if k in turn), None)
    assistant = next((k for k in PAIR_ASSISTANT if k in turn), None)
    if user is None or assistant is None:
        return [turn]
    return [{"role": "user", "content": turn[user]}, {"role": "assistant", "content": turn[assistant]}]


def _media_first(turns: list[Any], counts: dict[str, int]) -> list[Any]:
    """With no placeholder of a kind at all, its media go before the first user message's text (as LLaMA-Factory
    does): ``counts`` of each such kind, images before videos."""
    slots = [{"type": kind} for kind in ("image", "video") for _ in range(counts.get(kind, 0))]
    out = list(turns)
    for i, turn in enumerate(out):
        if isinstance(turn, dict) and ROLES.get(turn.get("role", turn.get("from"))) == "user":
            key = "content" if "content" in turn else "value"
            content = turn.get(key)
            if isinstance(content, str):
                out[i] = {**turn, key: slots + [_text_part(content)]}
            elif isinstance(content, list):
                out[i] = {**turn, key: slots + content}
            return out
    return out


def _count_slots(turn: Any, placeholders: Placeholders, kind: str) -> int:
    content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
    counted = placeholders is not Placeholders.TEXT
    mark = PLACEHOLDERS[kind]
    if isinstance(content, str):
        return content.count(mark) if counted else 0
    if isinstance(content, list):
        return sum(1 if _is_slot(part, kind) else _text(part).count(mark) if counted else 0 for part in content)
    return 0


def _is_slot(part: Any, kind: str) -> bool:
    """Whether ``part`` is an empty ``{"type": kind}`` part, which takes the next item of the record's list."""
    return isinstance(part, dict) and part.get("type") == kind and part.get(kind) is None


def _text(part: Any) -> str:
    is_text = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    return part["text"] if is_text else ""


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _text_parts(text: str, media: dict[str, Any], rule: Placeholders) -> list[dict[str, Any]]:
    """A string's parts under ``rule``: text, and an image (a video) for each placeholder of the kinds in
    ``media`` (each kind's next items)."""
    if rule is Placeholders.TEXT:
        return [_text_part(text)] if text else []
    marks = {PLACEHOLDERS[kind]: kind for kind in media}
    parts: list[dict[str, Any]] = []
    for piece in re.split("(" + "|".join(map(re.escape, marks)) + ")", text):
        if piece in marks:
            kind = marks[piece]
            parts.append({"type": kind, kind: next(media[kind])})
            continue
        if rule is Placeholders.STRIP:
            piece = piece.strip()
        if piece:
            parts.append(_text_part(piece))
    return parts


def _part(part: Any, media: dict[str, Any], rule: Placeholders) -> list[Any]:
    for kind in media:
        if _is_slot(part, kind):
            return [{"type": kind, kind: next(media[kind])}]
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str | None):
        return _text_parts(part.get("text") or "", media, rule)  # drops Hugging Face's "index": null
    return [part]
