"""The manifest: the build's table of contents, written last.

``DIR/manifest.json`` lists every shard with its sample count, size and sha256,
the totals, and the config that produced it (model family, tokenizer name and
fingerprint, pixel bounds, max_length, train_on, ...). Its presence means the
build is complete.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardkit.errors import ShardError
from shardkit.storage import join, open_fs, write_bytes

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ShardEntry(BaseModel):
    """One shard file, its path relative to the build folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    num_samples: int = Field(ge=0)
    num_tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class IndexFile(BaseModel):
    """The per-sample index file (see :mod:`shardkit.shards.index`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    num_rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """A complete build."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = MANIFEST_VERSION
    format: str
    num_records: int
    num_samples: int
    num_images: int
    num_tokens: int
    num_trained_tokens: int
    num_rejected: int
    num_fitted: int
    num_truncated: int
    rejects_by_code: dict[str, int]
    shards: list[ShardEntry]
    index: IndexFile
    config: dict[str, Any]
    created_by: str

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2) + "\n").encode()

    def write(self, fs: Any, folder: str) -> None:
        write_bytes(fs, join(folder, MANIFEST_NAME), self.to_json())


def read_manifest(location: str) -> Manifest:
    """The manifest of the build at ``location`` (folder or URL); :class:`ShardError` if absent or invalid."""
    fs, folder = open_fs(location)
    path = join(folder, MANIFEST_NAME)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ShardError(f"{location} has no {MANIFEST_NAME}: not a complete shardkit build") from None
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise ShardError(f"{path} is not a valid shardkit manifest: {exc.errors()[0]['msg']}") from None
