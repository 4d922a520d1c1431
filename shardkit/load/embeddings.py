"""The stage that gives samples their cached image embeddings (from ``shardkit embed``) in place of their images.

:class:`EmbeddedSource` wraps a build's source (:class:`~shardkit.load.source.BuildSource`)
and is read like it, by :class:`~shardkit.load.stream.ShardStream`; each sample it
returns is an :class:`~shardkit.shards.embeddings.EmbeddedSample`, its image bytes
replaced by its images' cached tensors, checked against their checksum::

    stream = ShardStream(EmbeddedSource("shards/", "shards-emb/"), batch_size=4)

:class:`~shardkit.load.batch.EmbeddingCollator` makes model inputs of such samples.
"""

from __future__ import annotations

from dataclasses import fields

from shardkit.errors import ConfigError, ShardCorruptError, ShardError
from shardkit.load.source import BuildSource, ShardFiles
from shardkit.shards import Sample
from shardkit.shards.base import checksum_of
from shardkit.shards.embeddings import (
    EmbeddedSample,
    EmbeddingManifest,
    read_blob,
    read_embedding_manifest,
    verify_embeddings,
)
from shardkit.shards.files import reading_error
from shardkit.shards.index import SampleIndex, load_index
from shardkit.storage import join, open_fs

#: why a build with videos has no embeddings cache
NO_VIDEO_EMBEDDINGS = (
    "the image embeddings cache holds images only (a video's features, from pairs of frames, are not cached); "
    "train a build with videos without --image-embeddings"
)


def refuse_videos(build: BuildSource) -> None:
    """:class:`ConfigError` when ``build`` holds videos: they have no embeddings (:data:`NO_VIDEO_EMBEDDINGS`)."""
    if build.manifest.num_videos:
        raise ConfigError(f"{build.location} holds {build.manifest.num_videos} videos: {NO_VIDEO_EMBEDDINGS}")


class EmbeddedSource:
    """The samples of ``build`` (a location, or a :class:`BuildSource`) by id, with the cached image embeddings at
    ``embeddings`` in place of their images; refuses a cache made from another build. ``verify=True`` checks every
    file of the cache (and of the build, when it opens it) against its manifest first."""

    def __init__(self, build: str | BuildSource, embeddings: str, *, verify: bool = False):
        self.build = build if isinstance(build, BuildSource) else BuildSource(build, verify=verify)
        self.location, self.manifest, self.index = self.build.location, self.build.manifest, self.build.index
        refuse_videos(self.build)
        self.embeddings_location = embeddings
        self.embeddings: EmbeddingManifest = read_embedding_manifest(embeddings)
        if self.embeddings.build.manifest_sha256 != self.manifest.sha256:
            raise ConfigError(
                f"the image embeddings in {embeddings} were made from another build than {self.location} "
                "(or from an earlier version of it): run shardkit embed on this build"
            )
        fs, folder = open_fs(embeddings)
        path = join(folder, self.embeddings.index.path)
        self._index: SampleIndex = load_index(fs, path, self.embeddings.index)
        if len(self._index) != self.embeddings.num_samples:
            raise ShardError(f"{path} has {len(self._index)} rows, the manifest {self.embeddings.num_samples} samples")
        self._files = ShardFiles(embeddings, [join(folder, s.path) for s in self.embeddings.shards])
        if verify and (problems := verify_embeddings(embeddings)):
            raise ShardError("; ".join(problems))

    @property
    def shard_sizes(self) -> list[int]:
        return self.build.shard_sizes

    def __len__(self) -> int:
        return len(self.build)

    def get(self, sample_id: int) -> EmbeddedSample:
        """The sample with this id, its cached tensors in place of its image bytes."""
        sample = self.build.get(sample_id)
        number = int(self._index.shard[sample_id])
        offset, size = int(self._index.offset[sample_id]), int(self._index.size[sample_id])
        path = self._files.paths[number]
        try:
            key, blob = read_blob(self._files.get(number), offset, size)
        except Exception as exc:  # a ShardError (from opening it) as it is; the file, the network; else the bytes
            raise reading_error(exc, f"embeddings shard {path} (sample {sample_id} at {offset})") or ShardCorruptError(
                f"embeddings shard {path} is truncated or corrupt (sample {sample_id}, key {sample.key!r}, "
                f"at {offset}): {exc}"
            ) from None
        if key != sample.key:
            raise ShardCorruptError(
                f"embeddings shard {path}: sample {sample_id} holds key {key!r}, the build's sample is {sample.key!r}"
            )
        if self._index.checksum is not None and checksum_of(blob) != int(self._index.checksum[sample_id]):
            raise ShardCorruptError(
                f"embeddings shard {path}: sample {sample_id} (key {key!r}) does not match its checksum"
            )
        values = {f.name: getattr(sample, f.name) for f in fields(Sample)}
        return EmbeddedSample(**{**values, "images": []}, features=blob)

    def close(self) -> None:
        self.build.close()
        self._files.close()
