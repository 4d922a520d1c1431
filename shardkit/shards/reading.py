"""Reading a whole build, shard after shard, in manifest order."""

from __future__ import annotations

from collections.abc import Iterator

from shardkit.shards import Manifest, Sample, get_reader, read_manifest
from shardkit.storage import join, open_fs


def iter_build_samples(location: str, manifest: Manifest | None = None, *, images: bool = True) -> Iterator[Sample]:
    """Every sample of the build at ``location`` in order; ``images=False`` skips image bytes."""
    manifest = manifest or read_manifest(location)
    fs, folder = open_fs(location)
    reader = get_reader(manifest.format)
    for shard in manifest.shards:
        with fs.open(join(folder, shard.path), "rb") as f:
            yield from reader.samples(f, images=images)
