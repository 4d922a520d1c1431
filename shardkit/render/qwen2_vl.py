"""Qwen2-VL and Qwen2.5-VL: the chat template shipped with their Instruct tokenizers.

``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`` is injected when
the conversation does not start with a system message; each message is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; an image is
``<|vision_start|><|image_pad|>...<|vision_end|>``. The whole string is tokenized
at once, as ``tokenizer.apply_chat_template`` does, so the tokens are identical.
A trained message's content and its ``<|im_end|>`` carry weight; the header and
the newline after ``<|im_end|>`` do not.
"""

from __future__ import annotations

from dataclasses import replace

from shardkit.render.base import Family, Piece, Renderer, TrainOn
from shardkit.schema import Record

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Qwen2VLRenderer(Renderer):
    """Renderer for the Qwen2-VL / Qwen2.5-VL Instruct chat template."""

    DEFAULT_SYSTEM = "You are a helpful assistant."
    # Qwen2-VL's added tokens end at <|video_pad|> (tokenizer_config.json of Qwen/Qwen2-VL-2B-Instruct)
    LAST_ADDED_ID = 151656

    def pieces(self, record: Record, train_on: TrainOn) -> list[Piece]:
        default = Piece(f"{self.IM_START}system\n{self.DEFAULT_SYSTEM}{self.IM_END}\n")
        return ([] if record.messages[0].role == "system" else [default]) + self.chatml_pieces(record, train_on)


QWEN2_VL = Family(
    name="qwen2_vl",
    renderer=Qwen2VLRenderer,
    patch_size=14,
    merge_size=2,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 1280,
)


class Qwen25VLRenderer(Qwen2VLRenderer):
    """Qwen2.5-VL: Qwen2-VL's chat template, with the added tokens up to ``<|file_sep|>``."""

    # <tool_call> ... <|file_sep|> (151657-151664) are added tokens of Qwen2.5-VL, Qwen3's later ones are not
    # (tokenizer_config.json of Qwen/Qwen2.5-VL-3B-Instruct)
    LAST_ADDED_ID = 151664


QWEN2_5_VL = replace(QWEN2_VL, name="qwen2_5_vl", renderer=Qwen25VLRenderer)  # same template, grid, normalisation
