"""Chat rendering per model family, behind a small registry."""

from __future__ import annotations

from shardkit.errors import ConfigError
from shardkit.render.base import Expanded, Family, Piece, Rendered, Renderer, TrainOn
from shardkit.render.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from shardkit.render.qwen3_vl import QWEN3_VL, QWEN3_VL_HF

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_HF)}


def get_family(name: str) -> Family:
    """The family registered under ``name`` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_hf``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Expanded", "Family", "Piece", "Rendered", "Renderer", "TrainOn", "get_family"]
