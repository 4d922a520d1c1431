"""Rendering a conversation into tokens with one loss weight per token.

A family's renderer turns a :class:`~shardkit.schema.Record` into a list of
:class:`Piece` s (text with a weight, or an image slot) in the family's chat
format. :meth:`Renderer.render` tokenizes them with the real tokenizer, giving
a :class:`Rendered` that holds one placeholder token per image; once the image
sizes are known, :meth:`Rendered.expand` puts each image's pad tokens in place.

What trains is decided in one place, :func:`targets` (by :class:`TrainOn` and a
message's own ``loss``); image tokens, headers and the injected default system
prompt never carry weight. The families themselves (their renderers among their
other facts) are in :mod:`shardkit.families`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

import numpy as np

from shardkit.errors import ConfigError, RecordError
from shardkit.schema import ImagePart, Record
from shardkit.tokenizer import without_added_tokens_above


class TrainOn(StrEnum):
    """Which tokens are training targets."""

    LAST_ASSISTANT = "last_assistant"
    """The last assistant message (its text and end token)."""
    ALL_ASSISTANT = "all_assistant"
    """Every assistant message."""
    ALL = "all"
    """The text of every message (system, user, assistant); never headers or image tokens."""

    @property
    def meaning(self) -> str:
        """What it trains, in a few words."""
        return {"last_assistant": "the last assistant turn only", "all_assistant": "every assistant turn"}.get(
            self.value, "the text of every message"
        )


@dataclass(frozen=True)
class Piece:
    """A span of rendered text and its weight, or an image slot (``image=True``).

    ``new_unit`` forces a tokenization boundary before the piece, for families
    whose reference renderer encodes headers and contents separately.
    """

    text: str
    weight: float = 0.0
    image: bool = False
    new_unit: bool = False


@dataclass(frozen=True)
class Expanded:
    """Final token ids, weights and image spans ``(start, length)`` of one sample."""

    input_ids: np.ndarray
    weights: np.ndarray
    image_spans: list[tuple[int, int]]


@dataclass(frozen=True)
class Rendered:
    """Tokens and weights with a single placeholder token at each image slot."""

    tokens: np.ndarray
    weights: np.ndarray
    image_slots: np.ndarray

    @property
    def num_text_tokens(self) -> int:
        """Tokens other than image pads (vision start/end markers included)."""
        return len(self.tokens) - len(self.image_slots)

    def expand(self, image_tokens: Sequence[int]) -> Expanded:
        """Replace each placeholder by its image's run of pad tokens."""
        if len(image_tokens) != len(self.image_slots):
            raise ValueError(f"{len(self.image_slots)} image slots, {len(image_tokens)} token counts")
        repeats = np.ones(len(self.tokens), dtype=np.int64)
        repeats[self.image_slots] = image_tokens
        input_ids = np.repeat(self.tokens, repeats)
        weights = np.repeat(self.weights, repeats)
        starts = self.image_slots + np.concatenate([[0], np.cumsum(np.asarray(image_tokens) - 1)[:-1]]).astype(np.int64)
        spans = [(int(s), int(n)) for s, n in zip(starts, image_tokens, strict=True)]
        return Expanded(input_ids.astype(np.int32), weights.astype(np.float32), spans)


@dataclass(frozen=True)
class ChatTokens:
    """A family's special tokens as text (their ids are the tokenizer's: :attr:`Renderer.ids`).

    The defaults are the Qwen chat markup, shared by every family so far.
    """

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"
    #: tokens a record's text may not hold (they would be read as markup)
    reserved: tuple[str, ...] = (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    )

    def markup(self) -> dict[str, str]:
        """The tokens the renderer writes, by name: ``{"im_start": "<|im_start|>", ...}``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "reserved"}


def targets(record: Record, train_on: TrainOn) -> list[bool]:
    """Whether each message's content is a training target under ``train_on``: the one decision of what trains.

    A message's own ``loss`` (true or false), where given, decides for that message instead.
    """
    last = max((i for i, m in enumerate(record.messages) if m.role == "assistant"), default=None)
    out = []
    for i, message in enumerate(record.messages):
        match train_on:
            case _ if message.loss is not None:
                target = message.loss
            case TrainOn.ALL:
                target = True
            case TrainOn.ALL_ASSISTANT:
                target = message.role == "assistant"
            case TrainOn.LAST_ASSISTANT:
                target = i == last
        out.append(target)
    return out


class Renderer(ABC):
    """Base of the per-family renderers (Qwen chat markup with vision markers); made by
    :meth:`shardkit.families.Family.renderer` with the family's tokens and vocabulary bound."""

    def __init__(self, tokenizer: Any, tokens: ChatTokens, last_added_id: int | None):
        """``tokenizer``: a Hugging Face fast tokenizer (its Rust backend does the work); its added tokens past
        ``last_added_id`` (the model's last) are read as plain text."""
        self.tokens = tokens
        self.backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if last_added_id is not None and hasattr(self.backend, "get_added_tokens_decoder"):
            self.backend = without_added_tokens_above(self.backend, last_added_id)
        self.ids: dict[str, int] = {}
        for name, token in tokens.markup().items():
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                raise ConfigError(f"the tokenizer has no {token} token: it is not a Qwen2-VL family tokenizer")
            self.ids[name] = token_id
        self._reserved = re.compile("|".join(re.escape(t) for t in tokens.reserved))

    @abstractmethod
    def pieces(self, record: Record, weights: list[float]) -> list[Piece]:
        """The conversation in this family's chat format; ``weights[i]`` is message ``i``'s content's weight."""

    def chatml_pieces(self, record: Record, weights: list[float]) -> list[Piece]:
        """Each message as the published Qwen chat templates write it, ``<|im_start|>{role}\\n{content}<|im_end|>\\n``,
        one string tokenized at once; a trained message's content and ``<|im_end|>`` carry weight."""
        out: list[Piece] = []
        for i, (message, weight) in enumerate(zip(record.messages, weights, strict=True)):
            out.append(Piece(f"{self.tokens.im_start}{message.role}\n"))
            out += self.content_pieces(record, i, weight)
            out += [Piece(self.tokens.im_end, weight), Piece("\n")]
        return out

    def content_pieces(self, record: Record, index: int, weight: float) -> list[Piece]:
        """A message's parts: text with ``weight``, images wrapped in vision markers (never weighted)."""
        tokens, out = self.tokens, []
        for part in record.messages[index].content:
            if isinstance(part, ImagePart):
                out += [Piece(tokens.vision_start), Piece(tokens.image_pad, image=True), Piece(tokens.vision_end)]
            else:
                out.append(Piece(part.text, weight))
        return out

    def check_text(self, record: Record) -> None:
        """Reject text that contains the family's reserved tokens (they would be read as markup)."""
        for i, message in enumerate(record.messages):
            for part in message.content:
                text = getattr(part, "text", None)
                if text and (found := self._reserved.search(text)):
                    raise RecordError(
                        f"messages[{i}] text contains the reserved token {found.group()!r}",
                        "reserved_token",
                    )

    def render(self, record: Record, train_on: TrainOn) -> Rendered:
        """Tokenize the conversation, its text checked for reserved tokens; each image is one placeholder token
        for now. What trains is decided by :func:`targets`."""
        self.check_text(record)
        weights = [1.0 if target else 0.0 for target in targets(record, train_on)]
        units: list[list[Piece]] = []
        for piece in self.pieces(record, weights):
            if piece.new_unit or not units:
                units.append([])
            units[-1].append(piece)
        tokens: list[np.ndarray] = []
        weights_of_tokens: list[np.ndarray] = []
        for unit in units:
            ids, w = self._encode_unit(unit)
            tokens.append(ids)
            weights_of_tokens.append(w)
        all_tokens = np.concatenate(tokens).astype(np.int32)
        return Rendered(
            tokens=all_tokens,
            weights=np.concatenate(weights_of_tokens).astype(np.float32),
            image_slots=np.flatnonzero(all_tokens == self.ids["image_pad"]),
        )

    def _encode_unit(self, unit: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
        # One encode of the joined text, as the chat template's tokenization does;
        # each token takes the weight of the piece holding its last character.
        text = "".join(p.text for p in unit)
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if not len(ids):
            return ids, np.zeros(0, dtype=np.float32)
        ends = np.asarray([max(end - 1, start) for start, end in encoding.offsets], dtype=np.int64)
        piece_ends = np.cumsum([len(p.text) for p in unit])
        owner = np.searchsorted(piece_ends, ends, side="right")
        piece_weights = np.asarray([p.weight for p in unit], dtype=np.float32)
        return ids, piece_weights[np.minimum(owner, len(unit) - 1)]
