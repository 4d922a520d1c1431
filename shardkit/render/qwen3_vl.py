"""Qwen3-VL Instruct, as tinker-cookbook's ``qwen3_vl_instruct`` renderer writes it.

No default system prompt. Message ``i`` is a header ``\\n<|im_start|>{role}\\n``
(without the leading newline for the first message), tokenized on its own, then
its content and ``<|im_end|>``. Content and ``<|im_end|>`` of a trained message
carry weight. Images use the 32-pixel grid (patch 16, merge 2) and the
processor's 0.5 mean/std normalisation; the processor's own minimum is 256x256.
"""

from __future__ import annotations

from dataclasses import replace

from shardkit.render.base import Family, Piece, Renderer, TrainOn
from shardkit.schema import Record


class Qwen3VLRenderer(Renderer):
    """Renderer for Qwen3-VL Instruct (Tinker's ``qwen3_vl_instruct``)."""

    def pieces(self, record: Record, train_on: TrainOn) -> list[Piece]:
        out: list[Piece] = []
        for i, message in enumerate(record.messages):
            weight = 1.0 if self.trained(record, i, train_on) else 0.0
            newline = "\n" if i else ""
            out.append(Piece(f"{newline}{self.IM_START}{message.role}\n", new_unit=True))
            content = self.content_pieces(record, i, weight) + [Piece(self.IM_END, weight)]
            out += [replace(content[0], new_unit=True), *content[1:]]
        return out


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
