"""Rendering a conversation into tokens with one loss weight per token.

A family's renderer turns a :class:`~shardkit.schema.Record` into a list of
:class:`Piece` s (text with a weight, an image slot, or a video) in the family's chat
format. :meth:`Renderer.render` tokenizes them with the real tokenizer, giving
a :class:`Rendered` that holds one placeholder token per image (and per video
block); once the image sizes are known, :meth:`Rendered.expand` puts each
image's (block's) pad tokens in place. A video is written as its
:class:`~shardkit.video.VideoPlan` says: one ``<|vision_start|><|video_pad|><|vision_end|>``
block (Qwen2-VL, Qwen2.5-VL), or a ``<t seconds>`` timestamp and a block per
temporal patch (Qwen3-VL), the timestamps encoded with the text before them as
``Qwen3VLProcessor`` does.

What trains is decided in one place, :func:`targets` (by :class:`TrainOn` and a
message's own ``loss``); image tokens, headers and the injected default system
prompt never carry weight. The families themselves (their renderers among their
other facts) are in :mod:`shardkit.families`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

import numpy as np

from shardkit.errors import ConfigError, RecordError
from shardkit.schema import ImagePart, Record, TextPart, VideoPart
from shardkit.tokenizer import without_added_tokens_above
from shardkit.video import VideoPlan


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
    """A span of rendered text and its weight, or an image slot (``image=True``), or a video (``video=True``, no
    text: :meth:`Renderer.render` writes it as its plan says).

    ``new_unit`` forces a tokenization boundary before the piece, for families
    whose reference renderer encodes headers and contents separately.
    """

    text: str
    weight: float = 0.0
    image: bool = False
    new_unit: bool = False
    video: bool = False


@dataclass(frozen=True)
class Expanded:
    """Final token ids, weights, image spans ``(start, length)`` and video block spans of one sample."""

    input_ids: np.ndarray
    weights: np.ndarray
    image_spans: list[tuple[int, int]]
    video_spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Rendered:
    """Tokens and weights with a single placeholder token at each image slot and each video block."""

    tokens: np.ndarray
    weights: np.ndarray
    image_slots: np.ndarray
    video_slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_text_tokens(self) -> int:
        """Tokens other than image and video pads (vision start/end markers and timestamps included)."""
        return len(self.tokens) - len(self.image_slots) - len(self.video_slots)

    def expand(self, image_tokens: Sequence[int], video_tokens: Sequence[int] = ()) -> Expanded:
        """Replace each placeholder by its image's (video block's) run of pad tokens."""
        if len(image_tokens) != len(self.image_slots):
            raise ValueError(f"{len(self.image_slots)} image slots, {len(image_tokens)} token counts")
        if len(video_tokens) != len(self.video_slots):
            raise ValueError(f"{len(self.video_slots)} video blocks, {len(video_tokens)} token counts")
        repeats = np.ones(len(self.tokens), dtype=np.int64)
        repeats[self.image_slots] = image_tokens
        repeats[self.video_slots] = video_tokens
        input_ids = np.repeat(self.tokens, repeats)
        weights = np.repeat(self.weights, repeats)
        starts = np.concatenate([[0], np.cumsum(repeats)[:-1]])
        image_spans = [(int(starts[i]), int(n)) for i, n in zip(self.image_slots, image_tokens, strict=True)]
        video_spans = [(int(starts[i]), int(n)) for i, n in zip(self.video_slots, video_tokens, strict=True)]
        return Expanded(input_ids.astype(np.int32), weights.astype(np.float32), image_spans, video_spans)


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
    video_pad: str = "<|video_pad|>"
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
        for message, weight in zip(record.messages, weights, strict=True):
            out.append(Piece(f"{self.tokens.im_start}{message.role}\n"))
            out += self.content_pieces(message.content, weight)
            out += [Piece(self.tokens.im_end, weight), Piece("\n")]
        return out

    def content_pieces(self, parts: Sequence[TextPart | ImagePart | VideoPart], weight: float) -> list[Piece]:
        """A message's parts: text with ``weight``, images wrapped in vision markers and videos (never weighted)."""
        tokens, out = self.tokens, []
        for part in parts:
            if isinstance(part, ImagePart):
                out += [Piece(tokens.vision_start), Piece(tokens.image_pad, image=True), Piece(tokens.vision_end)]
            elif isinstance(part, VideoPart):
                out.append(Piece("", video=True))
            else:
                out.append(Piece(part.text, weight))
        return out

    def video_pieces(self, plan: VideoPlan) -> list[Piece]:
        """A video as the processors write it: one vision block of ``<|video_pad|>`` (one placeholder here), or,
        where the plan has timestamps (Qwen3-VL), a timestamp and a block per temporal patch (never weighted)."""
        tokens = self.tokens
        block = [Piece(tokens.vision_start), Piece(tokens.video_pad), Piece(tokens.vision_end)]
        if not plan.timestamps:
            return block
        return [piece for stamp in plan.timestamps for piece in (Piece(stamp), *block)]

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

    def render(self, record: Record, train_on: TrainOn, videos: Sequence[VideoPlan] = ()) -> Rendered:
        """Tokenize the conversation, its text checked for reserved tokens; each image (video block) is one
        placeholder token for now. ``videos`` are the plans of the record's videos, in order (their timestamps are
        text). What trains is decided by :func:`targets`."""
        self.check_text(record)
        weights = [1.0 if target else 0.0 for target in targets(record, train_on)]
        plans = iter(videos)
        units: list[list[Piece]] = []
        for marked in self.pieces(record, weights):
            written = [marked]
            if marked.video:
                plan = next(plans, None)
                if plan is None:
                    raise ValueError(f"the record has more videos than the {len(videos)} plans given")
                written = self.video_pieces(plan)
                written[0] = replace(written[0], new_unit=marked.new_unit)
            for piece in written:
                if piece.new_unit or not units:
                    units.append([])
                units[-1].append(piece)
        if next(plans, None) is not None:
            raise ValueError(f"{len(videos)} video plans for a record of {len(record.videos())} videos")
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
            video_slots=np.flatnonzero(all_tokens == self.ids["video_pad"]),
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
