"""Qwen2-VL and Qwen2.5-VL: the chat template shipped with their Instruct tokenizers, their grid and classes.

``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`` is injected when
the conversation does not start with a system message; each message is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; an image is
``<|vision_start|><|image_pad|>...<|vision_end|>``. The whole string is tokenized
at once, as ``tokenizer.apply_chat_template`` does, so the tokens are identical.
A trained message's content and its ``<|im_end|>`` carry weight; the header and
the newline after ``<|im_end|>`` do not. Images use the 28-pixel grid (patch 14,
merge 2) and CLIP's normalisation.
"""

from __future__ import annotations

from dataclasses import replace

from shardkit.boxes import STYLES
from shardkit.families.base import Family
from shardkit.render import ChatTokens, Piece, Renderer
from shardkit.schema import Record
from shardkit.video import VideoGrid

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Qwen2VLVideoProcessor's defaults: each frame within 128 to 768 tokens of 28 x 28 pixels
QWEN2_VL_VIDEO = VideoGrid("qwen2_vl", 14, 128 * 28 * 28, 768 * 28 * 28)


class Qwen2VLRenderer(Renderer):
    """Renderer for the Qwen2-VL / Qwen2.5-VL Instruct chat template."""

    DEFAULT_SYSTEM = "You are a helpful assistant."

    def pieces(self, record: Record, weights: list[float]) -> list[Piece]:
        default = Piece(f"{self.tokens.im_start}system\n{self.DEFAULT_SYSTEM}{self.tokens.im_end}\n")
        return ([] if record.messages[0].role == "system" else [default]) + self.chatml_pieces(record, weights)


QWEN2_VL = Family(
    name="qwen2_vl",
    chat_format=Qwen2VLRenderer,
    tokens=ChatTokens(),
    # Qwen2-VL's added tokens end at <|video_pad|> (tokenizer_config.json of Qwen/Qwen2-VL-2B-Instruct)
    last_added_id=151656,
    patch_size=14,
    merge_size=2,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 1280,
    model_classes={"qwen2_vl": "Qwen2VLForConditionalGeneration"},
    processor_class="Qwen2VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_grid=QWEN2_VL_VIDEO,
    # boxes relative 0-1000 in box tokens, <|box_start|>(x1,y1),(x2,y2)<|box_end|> (paper 2409.12191, 2.2.1)
    boxes=True,
    box_style=STYLES["qwen2_vl"],
)

# Qwen2-VL's template, grid and normalisation; <tool_call> ... <|file_sep|> (151657-151664) are added tokens of
# Qwen2.5-VL, Qwen3's later ones are not (tokenizer_config.json of Qwen/Qwen2.5-VL-3B-Instruct)
QWEN2_5_VL = replace(
    QWEN2_VL,
    name="qwen2_5_vl",
    last_added_id=151664,
    model_classes={"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"},
    processor_class="Qwen2_5_VLProcessor",
    video_grid=replace(QWEN2_VL_VIDEO, processor="qwen2_5_vl"),
    # absolute pixels of the image the model sees, as its cookbook's JSON answers (spatial_understanding.ipynb)
    box_style=STYLES["qwen2_5_vl"],
)
