"""Qwen3-VL Instruct, in two token-level variants of the same chat format, with its grid and classes.

``qwen3_vl`` is tinker-cookbook's ``qwen3_vl_instruct`` renderer (what Tinker
trains on): no default system prompt; message ``i`` is a header
``\\n<|im_start|>{role}\\n`` (without the leading newline for the first
message), tokenized on its own, then its content and ``<|im_end|>``, tokenized
apart from the header. The conversation ends at the last ``<|im_end|>``.

``qwen3_vl_hf`` is the chat template published with the Qwen3-VL Instruct
checkpoints, as transformers' ``apply_chat_template`` renders it: no default
system prompt either; each message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
and the whole string is tokenized at once.

The two differ only in (1) the ``\\n`` after the last ``<|im_end|>`` (present
in ``qwen3_vl_hf``, weight 0) and (2) where the text meets a header: a content
that starts with whitespace or a newline can merge with the header's newline
in one encode, never in Tinker's separate ones. Neither has thinking blocks:
the Instruct template writes an assistant's text as given.

In both, the content and ``<|im_end|>`` of a trained message carry weight.
Images use the 32-pixel grid (patch 16, merge 2) and the processor's 0.5
mean/std normalisation; the processor's own minimum is 256x256. Their builds
train the dense and the MoE checkpoints alike.
"""

from __future__ import annotations

from dataclasses import replace

from shardkit.boxes import STYLES
from shardkit.families.base import Family
from shardkit.render import ChatTokens, Piece, Renderer
from shardkit.schema import Record
from shardkit.video import VideoGrid


class Qwen3VLRenderer(Renderer):
    """Renderer for Qwen3-VL Instruct as Tinker writes it (``qwen3_vl_instruct``)."""

    def pieces(self, record: Record, weights: list[float]) -> list[Piece]:
        out: list[Piece] = []
        for i, (message, weight) in enumerate(zip(record.messages, weights, strict=True)):
            newline = "\n" if i else ""
            out.append(Piece(f"{newline}{self.tokens.im_start}{message.role}\n", new_unit=True))
            content = self.content_pieces(message.content, weight) + [Piece(self.tokens.im_end, weight)]
            out += [replace(content[0], new_unit=True), *content[1:]]
        return out


class Qwen3VLTemplateRenderer(Renderer):
    """Renderer for the published Qwen3-VL Instruct chat template (transformers' ``apply_chat_template``)."""

    def pieces(self, record: Record, weights: list[float]) -> list[Piece]:
        return self.chatml_pieces(record, weights)


QWEN3_VL = Family(
    name="qwen3_vl",
    chat_format=Qwen3VLRenderer,
    tokens=ChatTokens(),
    last_added_id=None,  # every added token of the offline vocabulary is Qwen3's
    patch_size=16,
    merge_size=2,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    min_pixels=256 * 256,
    max_pixels=32 * 32 * 1280,
    model_classes={"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"},
    processor_class="Qwen3VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    # Qwen3VLVideoProcessor's defaults: the clip's frames together within 4,096 to 25,165,824 pixels
    video_grid=VideoGrid("qwen3_vl", 16, 4096, 25165824),
    tinker_renderer="qwen3_vl_instruct",
    # relative 0-1000 again, in its cookbook's JSON answers (2d_grounding.ipynb; paper 2511.21631, 3.2.4)
    boxes=True,
    box_style=STYLES["qwen3_vl"],
)

# the published template: the same grid and classes; Tinker's tokens differ where text meets a header
QWEN3_VL_HF = replace(QWEN3_VL, name="qwen3_vl_hf", chat_format=Qwen3VLTemplateRenderer, tinker_renderer=None)
