"""A stored sample as its reader sees it: turns of decoded tokens with weights, image (video block) spans as one item
each.

Each token is decoded on its own (byte-level BPE: the token's bytes, through an
incremental UTF-8 decoder, so a character split across tokens appears whole on
the token that completes it and the tokens before it show nothing). Added
tokens (``<|im_start|>``, ``<|vision_start|>``, ...) keep their names.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardkit.shards import Sample
from shardkit.shards.base import StoredImage, StoredVideo

TURN_START = "<|im_start|>"


#: control characters (but newline and tab) as visible symbols: C0 as their control pictures (␍, ␛, ...), DEL as ␡,
#: C1 and the bidirectional embeddings, overrides and isolates as ``\\uXXXX`` (they reorder the text around them)
_VISIBLE = {
    **{c: chr(0x2400 + c) for c in range(0x20) if chr(c) not in "\n\t"},
    0x7F: "␡",
    **{c: f"\\u{c:04x}" for c in [*range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]},
}


def visible(text: str) -> str:
    """``text`` with its control characters shown as symbols (``\\r`` as ␍, ESC as ␛), so a terminal or a page
    displays every character the model is trained on, in order."""
    return text.translate(_VISIBLE)


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte-to-character table (GPT-2's: printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


@dataclass(frozen=True)
class Token:
    """One token: its id, displayed text, loss weight, and whether it is an added (special) token."""

    id: int
    text: str
    weight: float
    special: bool


@dataclass(frozen=True)
class ImageSpan:
    """The run of ``<|image_pad|>`` tokens of one image, shown as one item."""

    number: int  # 1-based, in order of appearance
    width: int
    height: int
    original_width: int
    original_height: int
    grid_thw: tuple[int, int, int]
    num_tokens: int
    trained: int  # tokens of the span with weight > 0 (0 unless the build weighted image tokens)

    @property
    def label(self) -> str:
        return f"image {self.number} · {self.width}×{self.height} · {self.num_tokens} tokens"


@dataclass(frozen=True)
class VideoSpan(ImageSpan):
    """The run of ``<|video_pad|>`` tokens of one video block, shown as one item: a whole video (Qwen2-VL,
    Qwen2.5-VL), or one temporal patch of it (Qwen3-VL, whose blocks its timestamps separate)."""

    block: int = 1  # 1-based, in the video
    blocks: int = 1
    frames: int = 0  # frames stored

    @property
    def label(self) -> str:
        if self.blocks > 1:
            return f"video {self.number} · {self.block}/{self.blocks} · {self.num_tokens} tokens"
        return f"video {self.number} · {self.width}×{self.height} · {self.frames} frames · {self.num_tokens} tokens"


@dataclass(frozen=True)
class Turn:
    """The tokens from one ``<|im_start|>`` to the next, with the role its header names."""

    role: str
    items: list[Token | ImageSpan]


class TokenDecoder:
    """Decodes token ids one by one with a build's tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special = {int(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()}
        self.turn_start = self._id(TURN_START)
        self._bytes = _byte_decoder()

    def _id(self, token: str) -> int | None:
        value = self.tokenizer.convert_tokens_to_ids(token)
        return value if isinstance(value, int) and self.special.get(value) == token else None

    def texts(self, ids: np.ndarray) -> list[str]:
        """The displayed text of each token of ``ids`` (control characters made :func:`visible`)."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
        out = []
        for token_id, piece in zip(ids, pieces, strict=True):
            if int(token_id) in self.special:
                out.append(utf8.decode(b"", final=True) + self.special[int(token_id)])
                utf8.reset()
            elif all(c in self._bytes for c in piece):
                out.append(utf8.decode(bytes(self._bytes[c] for c in piece)))
            else:  # not byte-level BPE (e.g. a SentencePiece tokenizer): its own decoding of the one token
                out.append(utf8.decode(b"", final=True) + self.tokenizer.decode([int(token_id)]))
                utf8.reset()
        if out:
            out[-1] += utf8.decode(b"", final=True)
        return [visible(text) for text in out]

    def turns(self, sample: Sample) -> list[Turn]:
        """The sample's tokens split into turns, each image's tokens as one :class:`ImageSpan` (each video block's
        as one :class:`VideoSpan`)."""
        ids, weights = sample.input_ids, sample.weights
        images, videos = sample.stored.images, sample.stored.videos
        spans = {
            image.token_start: _span(n, image, image.token_start, image.num_tokens, image.grid_thw, weights)
            for n, image in enumerate(images, 1)
        }
        for n, video in enumerate(videos, 1):
            t, h, w = video.grid_thw
            grid = (1, h, w) if len(video.spans) > 1 else (t, h, w)  # a Qwen3-VL block is one temporal patch
            blocks, frames = len(video.spans), len(video.frame_indices)
            for block, (start, count) in enumerate(video.spans, 1):
                extra = {"block": block, "blocks": blocks, "frames": frames}
                spans[start] = _span(n, video, start, count, grid, weights, VideoSpan, **extra)
        runs = [(i.token_start, i.num_tokens) for i in images] + [(s, c) for v in videos for s, c in v.spans]
        texts = self.texts(np.delete(ids, _positions(runs)))
        turns: list[Turn] = []
        items: list[Token | ImageSpan] = []
        position, text_index = 0, 0
        while position < len(ids):
            if position in spans:
                items.append(spans[position])
                position += spans[position].num_tokens
                continue
            token_id = int(ids[position])
            if token_id == self.turn_start and items:
                turns.append(_turn(items))
                items = []
            special = token_id in self.special
            items.append(Token(token_id, texts[text_index], float(weights[position]), special))
            position, text_index = position + 1, text_index + 1
        if items:
            turns.append(_turn(items))
        return turns


def _positions(runs: list[tuple[int, int]]) -> np.ndarray:
    ranges = [np.arange(start, start + count) for start, count in runs]
    return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


def _span(
    number: int,
    media: StoredImage | StoredVideo,
    start: int,
    count: int,
    grid: Sequence[int],
    weights: np.ndarray,
    kind: type[ImageSpan] = ImageSpan,
    **extra: int,
) -> ImageSpan:
    """The item of ``count`` pad tokens from ``start``, of an image or a video (``kind=VideoSpan``, ``extra``)."""
    return kind(
        number=number,
        width=media.width,
        height=media.height,
        original_width=media.original_width,
        original_height=media.original_height,
        grid_thw=tuple(grid),
        num_tokens=count,
        trained=int(np.count_nonzero(weights[start : start + count] > 0)),
        **extra,
    )


def _turn(items: list[Token | ImageSpan]) -> Turn:
    """A turn; its role is the text after ``<|im_start|>`` up to the end of the header line."""
    role = ""
    if isinstance(items[0], Token) and items[0].text == TURN_START:
        for item in items[1:]:
            if not isinstance(item, Token) or "\n" in item.text:
                break
            role += item.text
    return Turn(role.strip(), items)
