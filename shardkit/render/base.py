"""Rendering a conversation into tokens with one loss weight per token.

A family's renderer turns a :class:`~shardkit.schema.Record` into a list of
:class:`Piece` s (text with a weight, or an image slot) in the family's chat
format. :meth:`Renderer.render` tokenizes them with the real tokenizer, giving
a :class:`Rendered` that holds one placeholder token per image; once the image
sizes are known, :meth:`Rendered.expand` puts each image's pad tokens in place.

Weights follow :class:`TrainOn`; image tokens, headers and the injected default
system prompt never carry weight.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

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
class Family:
    """A model family: its chat format and the image grid its processor expects."""

    name: str
    renderer: type[Renderer]
    patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int
    temporal_patch_size: int = 2

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    def manifest_entry(self) -> dict[str, Any]:
        """The family as a build's manifest records it (its name and image processor settings)."""
        return {
            "name": self.name,
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


class Renderer(ABC):
    """Base of the per-family renderers (Qwen chat markup with vision markers)."""

    IM_START = "<|im_start|>"
    IM_END = "<|im_end|>"
    VISION_START = "<|vision_start|>"
    VISION_END = "<|vision_end|>"
    IMAGE_PAD = "<|image_pad|>"
    RESERVED = (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    )
    _reserved_re = re.compile("|".join(re.escape(t) for t in RESERVED))
    #: the model's last added-token id: later added tokens of the given tokenizer are read as plain text
    LAST_ADDED_ID: ClassVar[int | None] = None

    def __init__(self, tokenizer: Any):
        """``tokenizer``: a Hugging Face fast tokenizer (its Rust backend does the work)."""
        self.backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if self.LAST_ADDED_ID is not None and hasattr(self.backend, "get_added_tokens_decoder"):
            self.backend = without_added_tokens_above(self.backend, self.LAST_ADDED_ID)
        self.ids = {}
        for token in (self.IM_START, self.IM_END, self.VISION_START, self.VISION_END, self.IMAGE_PAD):
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                raise ConfigError(f"the tokenizer has no {token} token: it is not a Qwen2-VL family tokenizer")
            self.ids[token] = token_id
        self.image_pad_id = self.ids[self.IMAGE_PAD]

    @abstractmethod
    def pieces(self, record: Record, train_on: TrainOn) -> list[Piece]:
        """The conversation in this family's chat format."""

    @staticmethod
    def trained(record: Record, index: int, train_on: TrainOn) -> bool:
        """Whether message ``index``'s content is a training target under ``train_on``.

        A message's own ``loss`` (true or false), where given, decides for that message instead.
        """
        if record.messages[index].loss is not None:
            return record.messages[index].loss
        role = record.messages[index].role
        if train_on is TrainOn.ALL:
            return True
        if role != "assistant":
            return False
        if train_on is TrainOn.ALL_ASSISTANT:
            return True
        last = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
        return index == last

    def chatml_pieces(self, record: Record, train_on: TrainOn) -> list[Piece]:
        """Each message as the published Qwen chat templates write it, ``<|im_start|>{role}\\n{content}<|im_end|>\\n``,
        one string tokenized at once; a trained message's content and ``<|im_end|>`` carry weight."""
        out: list[Piece] = []
        for i, message in enumerate(record.messages):
            weight = 1.0 if self.trained(record, i, train_on) else 0.0
            out.append(Piece(f"{self.IM_START}{message.role}\n"))
            out += self.content_pieces(record, i, weight)
            out += [Piece(self.IM_END, weight), Piece("\n")]
        return out

    def content_pieces(self, record: Record, index: int, weight: float) -> list[Piece]:
        """A message's parts: text with ``weight``, images wrapped in vision markers (never weighted)."""
        out = []
        for part in record.messages[index].content:
            if isinstance(part, ImagePart):
                out += [Piece(self.VISION_START), Piece(self.IMAGE_PAD, image=True), Piece(self.VISION_END)]
            else:
                out.append(Piece(part.text, weight))
        return out

    @classmethod
    def check_text(cls, record: Record) -> None:
        """Reject text that contains the family's control tokens (they would be read as markup)."""
        for i, message in enumerate(record.messages):
            for part in message.content:
                text = getattr(part, "text", None)
                if text and (found := cls._reserved_re.search(text)):
                    raise RecordError(
                        f"messages[{i}] text contains the reserved token {found.group()!r}",
                        "reserved_token",
                    )

    def render(self, record: Record, train_on: TrainOn) -> Rendered:
        """Tokenize the conversation; each image is one placeholder token for now."""
        self.check_text(record)
        units: list[list[Piece]] = []
        for piece in self.pieces(record, train_on):
            if piece.new_unit or not units:
                units.append([])
            units[-1].append(piece)
        tokens: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        for unit in units:
            ids, w = self._encode_unit(unit)
            tokens.append(ids)
            weights.append(w)
        all_tokens = np.concatenate(tokens).astype(np.int32)
        return Rendered(
            tokens=all_tokens,
            weights=np.concatenate(weights).astype(np.float32),
            image_slots=np.flatnonzero(all_tokens == self.image_pad_id),
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
