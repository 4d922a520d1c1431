"""Rendering a conversation into tokens and loss weights: the machinery every family's chat format uses (the
families themselves are in :mod:`shardkit.families`)."""

from __future__ import annotations

from shardkit.render.base import ChatTokens, Expanded, Piece, Rendered, Renderer, TrainOn, targets

__all__ = ["ChatTokens", "Expanded", "Piece", "Rendered", "Renderer", "TrainOn", "targets"]
