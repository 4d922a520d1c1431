"""``shardkit embed``: a model's vision tower run once over every image of a build, its output cached
(:mod:`shardkit.embed.run`), and the options of a run.

The options live here, apart from the code that runs them, so that reading them
needs no torch (the command line, ``--help`` included, is made from them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shardkit.options import Options


class EmbedConfig(Options):
    """Options of an embed pass."""

    build: str = Field(description="a shardkit build (folder or fsspec URL)")
    model: str = Field(description="the Qwen-VL model to train (local folder or Hugging Face id): its vision tower")
    out: str = Field(description="the embeddings folder (new, or to resume)")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="stored precision")
    batch_images: int = Field(32, ge=1, description="images per vision tower call")
    overwrite: bool = Field(False, description="replace embeddings made with another model or build")
