"""Shard formats: a writer/reader pair each, and the manifest."""

from __future__ import annotations

from shardkit.errors import ConfigError
from shardkit.shards.base import Sample, ShardPart, ShardReader, ShardWriter
from shardkit.shards.manifest import MANIFEST_NAME, BuildInfo, Manifest, ShardEntry, read_manifest
from shardkit.shards.parquet import ParquetShardReader, ParquetShardWriter
from shardkit.shards.tar import TarShardReader, TarShardWriter

WRITERS: dict[str, type[ShardWriter]] = {w.format: w for w in (TarShardWriter, ParquetShardWriter)}
READERS: dict[str, type[ShardReader]] = {r.format: r for r in (TarShardReader, ParquetShardReader)}


def get_reader(format: str) -> ShardReader:
    """The reader for a manifest's ``format``."""
    try:
        return READERS[format]()
    except KeyError:
        raise ConfigError(f"unknown shard format {format!r}; known: {', '.join(READERS)}") from None


__all__ = [
    "MANIFEST_NAME",
    "READERS",
    "WRITERS",
    "BuildInfo",
    "Manifest",
    "Sample",
    "ShardEntry",
    "ShardPart",
    "ShardReader",
    "ShardWriter",
    "get_reader",
    "read_manifest",
]
