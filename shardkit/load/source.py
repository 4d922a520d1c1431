"""Random access to the samples of a build, local or on any fsspec filesystem.

A :class:`BuildSource` opens a build by folder or URL, reads its manifest and
index (checked against each other: see :mod:`shardkit.shards.index`), and
returns samples by id (position in manifest order) by seeking to their
recorded location. Every sample read is checked against the checksum the index
recorded when it was written, so a flipped bit raises :class:`ShardError`
naming the shard and the sample; builds made before checksums existed are read
unchecked, with a warning. Shards are opened lazily and a few stay open. With
``verify=True`` every shard's size and sha256 are also checked against the
manifest once, before any sample is returned. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from shardkit.errors import ShardError
from shardkit.shards import Manifest, Sample, get_reader, read_manifest
from shardkit.shards.base import ChecksumMismatch, OpenShard
from shardkit.shards.files import open_regular, read_checked
from shardkit.shards.index import SampleIndex, read_index
from shardkit.shards.manifest import manifest_problems
from shardkit.storage import join, open_fs

OPEN_SHARDS = 4


class BuildSource:
    """Samples of the build at ``location`` by id; ``checksums=False`` reads them unchecked."""

    def __init__(
        self, location: str, *, verify: bool = False, checksums: bool = True, manifest: Manifest | None = None
    ):
        self.location = location
        self.manifest: Manifest = manifest or read_manifest(location)
        fs, self.folder = open_fs(location)
        if problems := manifest_problems(self.manifest):
            raise ShardError(f"{join(self.folder, 'manifest.json')} is inconsistent: {'; '.join(problems)}")
        self.index: SampleIndex = read_index(fs, self.folder, self.manifest)
        self.reader = get_reader(self.manifest.format)
        self.checksums = checksums and self.index.checksum is not None
        self._open: OrderedDict[int, tuple[Any, OpenShard]] = OrderedDict()
        self._pid = os.getpid()
        if verify and (problems := verify_build(location, self.manifest)):
            raise ShardError("; ".join(problems))

    @property
    def fs(self) -> Any:
        """The build's filesystem, made in this process (async ones, like s3fs, cannot cross a fork)."""
        return open_fs(self.location)[0]

    @property
    def shard_sizes(self) -> list[int]:
        return [s.num_samples for s in self.manifest.shards]

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get a copy without open files
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _shard(self, number: int) -> OpenShard:
        if self._pid != os.getpid():  # a forked DataLoader worker: the parent's open files are not ours
            self._open, self._pid = OrderedDict(), os.getpid()
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number][1]
        path = join(self.folder, self.manifest.shards[number].path)
        f = open_regular(self.fs, path)
        try:
            shard = self.reader.open(f)
        except Exception as exc:
            f.close()
            raise ShardError(f"shard {path} cannot be opened: {exc}") from None
        self._open[number] = (f, shard)
        while len(self._open) > OPEN_SHARDS:
            old, _ = self._open.popitem(last=False)[1]
            old.close()
        return shard

    def get(self, sample_id: int) -> Sample:
        """The sample with this id; :class:`ShardError` naming the shard and sample when it is damaged."""
        number = int(self.index.shard[sample_id])
        offset, size = int(self.index.offset[sample_id]), int(self.index.size[sample_id])
        checksum = int(self.index.checksum[sample_id]) if self.checksums else None
        path = join(self.folder, self.manifest.shards[number].path)
        try:
            return self._shard(number).read_at(offset, size, checksum)
        except ChecksumMismatch as exc:
            raise ShardError(
                f"shard {path}: sample {sample_id} (key {exc.key!r} as read, at {offset}) does not match its "
                "checksum: the shard is corrupt"
            ) from None
        except ShardError:
            raise
        except Exception as exc:
            raise ShardError(f"shard {path} is truncated or corrupt (sample {sample_id} at {offset}): {exc}") from None

    def samples(self, *, images: bool = True) -> Iterator[Sample]:
        """Every sample in manifest order, checked; ``images=False`` leaves out their image bytes."""
        for sample_id in range(len(self)):
            sample = self.get(sample_id)
            if not images:
                sample.images = []
            yield sample
        self.close()

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()


def verify_build(location: str, manifest: Manifest | None = None) -> list[str]:
    """Check a build against its manifest: the manifest's own consistency, every shard's size, sha256 and format,
    and the index against the shards; the problems found (empty: all good).

    Each file is read no further than its recorded size.
    """
    manifest = manifest or read_manifest(location)
    fs, folder = open_fs(location)
    problems = manifest_problems(manifest)
    consistent = not problems
    reader = get_reader(manifest.format) if consistent else None
    for shard in manifest.shards:
        path = join(folder, shard.path)
        try:
            head = read_checked(fs, path, shard.bytes, shard.sha256)
        except ShardError as exc:
            problems.append(str(exc))
            continue
        if reader and not reader.recognises(head):
            problems.append(f"{path} is not a {manifest.format} file, the format the manifest gives")
    if consistent:
        try:
            read_index(fs, folder, manifest)
        except ShardError as exc:
            problems.append(str(exc))
    return problems
