"""Random access to the samples of a build, local or on any fsspec filesystem.

A :class:`BuildSource` opens a build by folder or URL, reads its manifest and
index (checked against each other: see :mod:`shardkit.shards.index`), and
returns samples by id (position in manifest order) by seeking to their
recorded location. Every sample read is checked against the checksum the index
recorded when it was written, so a flipped bit raises
:class:`~shardkit.errors.ShardCorruptError` naming the shard and the sample, as
does JSON that its typed model (:class:`~shardkit.shards.base.SampleInfo`)
refuses (text where a number belongs); a
shard that is missing, may not be read or cannot be reached raises
:class:`~shardkit.errors.ShardMissingError`, :class:`~shardkit.errors.ShardAccessError`
or :class:`~shardkit.errors.ShardNetworkError` instead. Builds made before
checksums existed are read unchecked, with a warning. Shards are opened lazily
(:class:`ShardFiles`) and a few stay open. With
``verify=True`` every shard's size and sha256 are also checked against the
manifest once, before any sample is returned. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from pydantic import ValidationError

from shardkit.errors import ShardCorruptError, ShardError
from shardkit.shards import WRITERS, Manifest, Sample, get_reader, read_manifest
from shardkit.shards.base import ChecksumMismatch, OpenShard
from shardkit.shards.files import open_regular, read_checked, reading_error
from shardkit.shards.index import SampleIndex, read_index
from shardkit.shards.manifest import family_problems
from shardkit.storage import join, open_fs

OPEN_SHARDS = 4


class Source(Protocol):
    """What a stream reads: samples by id (position in manifest order), and the build's manifest and index, which
    give their order and lengths. :class:`BuildSource` is one; a stage over it (cached embeddings) is another."""

    location: str
    manifest: Manifest
    index: SampleIndex

    @property
    def shard_sizes(self) -> list[int]: ...

    def __len__(self) -> int: ...

    def get(self, sample_id: int) -> Sample: ...


class ShardFiles:
    """The shard files ``paths`` of the folder at ``location``, opened on first use (regular files only), each
    through ``opener`` when given; the last few used stay open. A copy in another process (a DataLoader worker,
    pickled or forked) opens its own."""

    def __init__(self, location: str, paths: Sequence[str], opener: Callable[[Any], Any] | None = None):
        self.location = location
        self.paths = list(paths)
        self.opener = opener
        self._open: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}

    def get(self, number: int) -> Any:
        """Shard ``number``, open; :class:`ShardError` saying why it cannot be (see :func:`reading_error`)."""
        if self._pid != os.getpid():  # a forked process: the parent's open files are not ours
            self._open, self._pid = OrderedDict(), os.getpid()
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number][1]
        path = self.paths[number]
        f = open_regular(open_fs(self.location)[0], path)  # the filesystem made in this process
        try:
            opened = f if self.opener is None else self.opener(f)
        except Exception as exc:
            f.close()
            raise reading_error(exc, path) or ShardCorruptError(f"shard {path} cannot be opened: {exc}") from None
        self._open[number] = (f, opened)
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1][0].close()
        return opened

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()


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
        self.files = ShardFiles(location, [join(self.folder, s.path) for s in self.manifest.shards], self.reader.open)
        if verify and (problems := verify_build(location, self.manifest)):
            raise ShardError("; ".join(problems))

    @property
    def fs(self) -> Any:
        """The build's filesystem, made in this process (async ones, like s3fs, cannot cross a fork)."""
        return open_fs(self.location)[0]

    @property
    def shard_sizes(self) -> list[int]:
        return [s.num_samples for s in self.manifest.shards]

    @property
    def num_grounded(self) -> int:
        """Grounding boxes and points in the build (:attr:`Manifest.num_grounded`)."""
        return self.manifest.num_grounded

    def __len__(self) -> int:
        return self.manifest.num_samples

    def get(self, sample_id: int) -> Sample:
        """The sample with this id; a :class:`ShardError` naming the shard and the sample when it cannot be read:
        :class:`ShardCorruptError` when its bytes are damaged, the others when the shard cannot be reached."""
        number = int(self.index.shard[sample_id])
        offset, size = int(self.index.offset[sample_id]), int(self.index.size[sample_id])
        checksum = int(self.index.checksum[sample_id]) if self.checksums else None
        path = self.files.paths[number]
        try:
            shard: OpenShard = self.files.get(number)
            sample = shard.read_at(offset, size, checksum)
        except ChecksumMismatch as exc:
            raise ShardCorruptError(
                f"shard {path}: sample {sample_id} (key {exc.key!r} as read, at {offset}) does not match its "
                "checksum: the shard is corrupt"
            ) from None
        except Exception as exc:  # a ShardError (from opening it) as it is; the file, the network; else the bytes
            raise reading_error(exc, f"shard {path} (sample {sample_id} at {offset})") or ShardCorruptError(
                f"shard {path} is truncated or corrupt (sample {sample_id} at {offset}): {exc}"
            ) from None
        try:
            sample.stored  # noqa: B018 -- every reader gets typed fields, or this error
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ShardCorruptError(
                f"shard {path}: sample {sample_id} (key {sample.key!r}) is not valid: "
                f"{'.'.join(map(str, error['loc']))}: {error['msg']}, got {repr(error['input'])[:80]}"
            ) from None
        return sample

    def samples(self, *, images: bool = True) -> Iterator[Sample]:
        """Every sample in manifest order, checked; ``images=False`` leaves out their image and video frame bytes."""
        for sample_id in range(len(self)):
            sample = self.get(sample_id)
            if not images:
                sample.images = []
                sample.videos = []
            yield sample
        self.close()

    def close(self) -> None:
        self.files.close()


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


def manifest_problems(manifest: Manifest) -> list[str]:
    """How the manifest disagrees with itself: totals against its shards, shard names against its format, the
    family's constants against the family it names."""
    shards = manifest.shards
    problems = family_problems(manifest.config)
    if manifest.format not in WRITERS:
        problems.append(f"unknown format {manifest.format!r}")
    elif wrong := [s.path for s in shards if not s.path.endswith(suffix := WRITERS[manifest.format].suffix)]:
        problems.append(f"format {manifest.format!r}, but shard {wrong[0]} is not a {suffix} file")
    if len({s.path for s in shards} | {manifest.index.path}) != len(shards) + 1:
        problems.append("two entries name the same file")
    for name, total, parts in (
        ("num_samples", manifest.num_samples, sum(s.num_samples for s in shards)),
        ("num_tokens", manifest.num_tokens, sum(s.num_tokens for s in shards)),
        ("the index's num_rows", manifest.index.num_rows, sum(s.num_samples for s in shards)),
    ):
        if total != parts:
            problems.append(f"{name} is {total}, but the shards add up to {parts}")
    return problems
