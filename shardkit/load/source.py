"""Random access to the samples of a build, local or on any fsspec filesystem.

A :class:`BuildSource` opens a build by folder or URL, reads its manifest and
index, and returns samples by id (position in manifest order) by seeking to
their recorded location. Shards are opened lazily and a few stay open. A
truncated or corrupt shard raises :class:`ShardError` naming the shard; with
``verify=True`` every shard's size and sha256 are checked against the manifest
once, before any sample is returned. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from shardkit.errors import ShardError
from shardkit.shards import Manifest, Sample, get_reader, read_manifest
from shardkit.shards.base import OpenShard
from shardkit.shards.embeddings import EmbeddingManifest
from shardkit.shards.index import SampleIndex, read_index
from shardkit.storage import hash_stream, join, open_fs

OPEN_SHARDS = 4


class BuildSource:
    """Samples of the build at ``location`` by id."""

    def __init__(self, location: str, *, verify: bool = False):
        self.location = location
        self.manifest: Manifest = read_manifest(location)
        fs, self.folder = open_fs(location)
        self.index: SampleIndex = read_index(fs, self.folder, self.manifest.num_samples)
        self.reader = get_reader(self.manifest.format)
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
        entry = self.manifest.shards[number]
        path = join(self.folder, entry.path)
        try:
            f = self.fs.open(path, "rb")
        except FileNotFoundError:
            raise ShardError(f"shard {path} is missing") from None
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
        """The sample with this id."""
        number = int(self.index.shard[sample_id])
        offset, size = int(self.index.offset[sample_id]), int(self.index.size[sample_id])
        try:
            return self._shard(number).read_at(offset, size)
        except ShardError:
            raise
        except Exception as exc:
            path = join(self.folder, self.manifest.shards[number].path)
            raise ShardError(f"shard {path} is truncated or corrupt (sample at {offset}): {exc}") from None

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()


def verify_shard(fs: Any, path: str, size: int, sha256: str) -> None:
    """Check a file's size and sha256; :class:`ShardError` naming it when they differ."""
    try:
        with fs.open(path, "rb") as f:
            read, digest = hash_stream(f)
    except FileNotFoundError:
        raise ShardError(f"{path} is missing") from None
    if read != size:
        raise ShardError(f"{path} has {read} bytes, the manifest says {size}: truncated or replaced")
    if digest.hexdigest() != sha256:
        raise ShardError(f"{path} does not match its sha256 in the manifest: corrupt or replaced")


def verify_build(location: str, manifest: Manifest | EmbeddingManifest | None = None) -> list[str]:
    """Check every shard and the index of a build (or embeddings folder) against its manifest; the problems found
    (empty: all good)."""
    manifest = manifest or read_manifest(location)
    fs, folder = open_fs(location)
    problems = []
    files = [(s.path, s.bytes, s.sha256) for s in manifest.shards]
    files.append((manifest.index.path, manifest.index.bytes, manifest.index.sha256))
    for path, size, sha in files:
        try:
            verify_shard(fs, join(folder, path), size, sha)
        except ShardError as exc:
            problems.append(str(exc))
    return problems
