"""Reading a whole build, shard after shard, in manifest order, every sample checked."""

from __future__ import annotations

from collections.abc import Iterator

from shardkit.shards import Manifest, Sample


def iter_build_samples(location: str, manifest: Manifest | None = None, *, images: bool = True) -> Iterator[Sample]:
    """Every sample of the build at ``location`` in order, checked against its checksum; ``images=False`` leaves
    out the image bytes."""
    from shardkit.load.source import BuildSource  # the one checked reader (load builds on shards)

    yield from BuildSource(location, manifest=manifest).samples(images=images)
