"""Qwen3-VL Instruct, in two token-level variants of the same chat format.

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
mean/std normalisation; the processor's own minimum is 256x256.
"""

from __future__ import annotations

from dataclasses import replace

from shardkit.render.base import Family, Piece, Renderer, TrainOn
from shardkit.schema import Record


class Qwen3VLRenderer(Renderer):
    """Renderer for Qwen3-VL Instruct as Tinker writes it (``qwen3_vl_instruct``)."""

    def pieces(self, record: Record, train_on: TrainOn) -> list[Piece]:
        out: list[Piece] = []
        for i, message in enumerate(record.messages):
            weight = 1.0 if self.trained(record, i, train_on) else 0.0
            newline = "\n" if i else ""
            out.append(Piece(f"{newline}{self.IM_START}{message.role}\n", new_unit=True))
            content = self.content_pieces(record, i, weight) + [Piece(self.IM_END, weight)]
            out += [replace(content[0], new_unit=True), *content[1:]]
        return out


class Qwen3VLTemplateRenderer(Renderer):
    """Renderer for the published Qwen3-VL Instruct chat template (transformers' ``apply_chat_template``)."""

    def pieces(self, record: Record, train_on: TrainOn) -> list[Piece]:
        return self.chatml_pieces(record, train_on)


QWEN3_VL = Family(
    name="qwen3_vl",
    renderer=Qwen3VLRenderer,
    patch_size=16,
    merge_size=2,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    min_pixels=256 * 256,
    max_pixels=32 * 32 * 1280,
)

QWEN3_VL_HF = replace(QWEN3_VL, name="qwen3_vl_hf", renderer=Qwen3VLTemplateRenderer)  # same grid
