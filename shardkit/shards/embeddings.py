"""Cached image embeddings of a build: the shard format and its manifest.

An embeddings folder (written by ``shardkit embed``) holds one shard per shard
of the build, with the same samples in the same order::

    build.json            written first: the identity of the embed pass (resume)
    shard-000000.tar ...  per sample one member ``KEY.safetensors``
    index.parquet         per sample: shard, byte offset and size, image tokens
    embeddings.json       written last: the pass is complete

A sample's ``KEY.safetensors`` holds, for each image ``i`` of the sample, its
named tensors ``"{i}.{name}"`` (``"0.embeds"``: the merged vision tower output,
``(image tokens, hidden)``; Qwen3-VL adds ``"0.deepstack.0"``, ...). The
manifest records which build it was made from (a hash of the build's manifest),
the vision tower's fingerprint (a hash of its weights and config), the dtype,
the tensor names, and every shard's size and sha256.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from shardkit.errors import ShardError
from shardkit.shards.base import Sample, checksum_of
from shardkit.shards.manifest import FolderManifest, IndexFile, ShardEntry, read_json_model
from shardkit.shards.tar import TarArchive, read_range, tar_member
from shardkit.shards.task import TaskRecord
from shardkit.storage import join, open_fs

EMBEDDINGS_NAME = "embeddings.json"
EMBEDDINGS_VERSION = 1
MEMBER = "safetensors"


class BuildRef(BaseModel):
    """The build the embeddings were computed from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    manifest_sha256: str
    num_samples: int
    num_images: int


class VisionTower(BaseModel):
    """The vision tower (with its merger) that computed the embeddings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    model_type: str
    fingerprint: str
    hidden_size: int


class EmbeddingManifest(FolderManifest):
    """A complete embeddings folder."""

    FILE: ClassVar[str] = EMBEDDINGS_NAME
    version: int = EMBEDDINGS_VERSION
    build: BuildRef
    vision: VisionTower
    dtype: Literal["bfloat16", "float32"]
    tensors: list[str]
    num_samples: int
    num_images: int
    num_image_tokens: int
    shards: list[ShardEntry]
    index: IndexFile
    created_by: str


def read_embedding_manifest(location: str) -> EmbeddingManifest:
    """The manifest of the embeddings at ``location``; :class:`ShardError` if absent or invalid."""
    return read_json_model(
        location, EMBEDDINGS_NAME, EmbeddingManifest, "shardkit embeddings folder", "embeddings manifest"
    )


def is_embeddings(location: str) -> bool:
    """Whether ``location`` holds a (complete) embeddings folder rather than a build."""
    fs, folder = open_fs(location)
    return fs.exists(join(folder, EMBEDDINGS_NAME))


class EmbedTaskResult(TaskRecord):
    """A finished embed task: its one shard, and the tensor names its samples hold."""

    model_config = ConfigDict(extra="forbid")
    tensors: list[str]


class EmbeddingShardWriter(TarArchive):
    """Writes one embeddings shard (a tar readable by plain ``webdataset``), atomically, as a build's tar shards
    are written; a sample is one ``KEY.safetensors`` member, its checksum that of the blob."""

    def write(self, key: str, blob: bytes, tokens: int) -> None:
        """Append one sample's tensors (a safetensors blob) for its ``tokens`` image tokens."""
        self._append(tar_member(f"{key}.{MEMBER}", blob), checksum_of(blob), tokens)


@dataclass
class EmbeddedSample(Sample):
    """A sample with its images' cached tensors (its ``KEY.safetensors`` blob) in place of its image bytes."""

    features: bytes = b""


def read_blob(f: Any, offset: int, size: int) -> tuple[str, bytes]:
    """``(key, safetensors blob)`` of the sample at a recorded location of an open shard."""
    data = read_range(f, offset, size)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as members:
        member = members.next()
        if member is None:
            raise EOFError(f"no member at offset {offset}")
        key, _, suffix = member.name.partition(".")
        if suffix != MEMBER:
            raise ValueError(f"unexpected member {member.name!r}")
        return key, members.extractfile(member).read()


def verify_embeddings(location: str) -> list[str]:
    """Check every shard and the index of an embeddings folder against its manifest (size and sha256, each file
    read no further than its recorded size); the problems found (empty: all good)."""
    from shardkit.shards.files import read_checked

    manifest = read_embedding_manifest(location)
    fs, folder = open_fs(location)
    problems = []
    for entry in [*manifest.shards, manifest.index]:
        try:
            read_checked(fs, join(folder, entry.path), entry.bytes, entry.sha256)
        except ShardError as exc:
            problems.append(str(exc))
    return problems
