"""The model families, one module each (its renderer and its :class:`Family`), and their registry.

Adding a family is one module holding its :class:`Family` (and its renderer, where its chat format is new) and
its entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from shardkit.errors import ConfigError
from shardkit.families.base import Family
from shardkit.families.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from shardkit.families.qwen3_5 import QWEN3_5, QWEN3_5_DISABLE_THINKING, QWEN3_5_HF, QWEN3_8, QWEN3_8_DISABLE_THINKING
from shardkit.families.qwen3_vl import QWEN3_VL, QWEN3_VL_HF

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        *(QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_HF),
        *(QWEN3_5, QWEN3_5_DISABLE_THINKING, QWEN3_5_HF, QWEN3_8, QWEN3_8_DISABLE_THINKING),
    )
}

#: transformers ``model_type`` -> the class name of the model, for every checkpoint a family's builds train
MODEL_CLASSES: dict[str, str] = {kind: cls for f in FAMILIES.values() for kind, cls in f.model_classes.items()}


def get_family(name: str) -> Family:
    """The family registered under ``name`` (a key of :data:`FAMILIES`: ``qwen2_vl``, ``qwen3_vl``, ``qwen3_5``...)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "MODEL_CLASSES", "Family", "get_family"]
