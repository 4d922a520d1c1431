"""Streaming loaders over a build: sample batches, torch batches, Tinker Datums."""

from shardkit.load.plan import Batching, Level, Shuffle
from shardkit.load.source import BuildSource, verify_build
from shardkit.load.stream import ShardStream

__all__ = ["Batching", "BuildSource", "Level", "ShardStream", "Shuffle", "verify_build"]
