"""Parquet shards with the same content as the tar shards, as columns.

Columns: ``key`` (string), ``line`` (int64), ``num_tokens`` (int32),
``input_ids`` (list<int32>), ``weights`` (list<float32>), ``images``
(list<binary>, JPEG) and ``json`` (the same JSON as the tar's ``KEY.json``),
and in a shard holding videos, ``videos`` (list<list<binary>>: each video's
frames, JPEG; :data:`VIDEO_SCHEMA`). A build's shard parts get that column from
the first sample with a video on (a part begun without it is closed there), so
image-only shards keep the image-only layout. Readable by pyarrow and Hugging
Face ``datasets``. Row groups hold :data:`ROWS_PER_GROUP` samples, so a reader
can start mid-shard without reading what comes before. A sample's checksum
covers its values as read (:func:`~shardkit.shards.base.content_checksum`); a
file whose schema is neither is refused.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.errors import ShardError
from shardkit.shards.base import ChecksumMismatch, OpenShard, Sample, ShardReader, ShardWriter, content_checksum

ROWS_PER_GROUP = 16

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("line", pa.int64()),
        ("num_tokens", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("weights", pa.list_(pa.float32())),
        ("images", pa.list_(pa.binary())),
        ("json", pa.string()),
    ]
)
VIDEO_SCHEMA = SCHEMA.append(pa.field("videos", pa.list_(pa.list_(pa.binary()))))


class ParquetShardWriter(ShardWriter):
    format = "parquet"
    suffix = ".parquet"

    def __init__(self, fs: Any, path: str, *, videos: bool = False):
        super().__init__(fs, path, videos=videos)
        compression = {
            "key": "zstd",
            "line": "zstd",
            "num_tokens": "zstd",
            "input_ids": "zstd",
            "weights": "zstd",
            "images": "none",
            "json": "zstd",
        }
        self._writer = pq.ParquetWriter(
            self._hashed,
            VIDEO_SCHEMA if videos else SCHEMA,
            compression=compression | ({"videos": "none"} if videos else {}),
            use_dictionary=False,
            write_statistics=["key", "line", "num_tokens"],
        )
        self._rows: list[Sample] = []

    def accepts(self, sample: Sample) -> bool:
        return self.videos or not sample.videos

    def write(self, sample: Sample) -> None:
        if not self.accepts(sample):
            raise ValueError(f"sample {sample.key} has videos: this shard was made without the videos column")
        digest = content_checksum(
            sample.key, sample.info_json, sample.input_ids, sample.weights, sample.images, sample.videos
        )
        self._record(self.num_samples, 1, digest, len(sample.input_ids))
        self._rows.append(sample)
        if len(self._rows) >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows = self._rows
        columns = {
            "key": [s.key for s in rows],
            "line": [s.info.get("line") for s in rows],
            "num_tokens": [len(s.input_ids) for s in rows],
            "input_ids": [s.input_ids for s in rows],
            "weights": [s.weights for s in rows],
            "images": [s.images for s in rows],
            "json": [s.info_json.decode() for s in rows],
        }
        if self.videos:
            columns["videos"] = [s.videos for s in rows]
        table = pa.table(columns, schema=VIDEO_SCHEMA if self.videos else SCHEMA)
        self._writer.write_table(table, row_group_size=len(rows))
        self._rows = []

    def _finish(self) -> None:
        self._flush()
        self._writer.close()


class ParquetShardReader(ShardReader):
    format = "parquet"
    magic = (0, b"PAR1")

    def open(self, f: Any) -> OpenShard:
        parquet = pq.ParquetFile(f)
        schema = parquet.schema_arrow
        if not (schema.equals(SCHEMA) or schema.equals(VIDEO_SCHEMA)):
            raise ShardError(f"not a shardkit Parquet shard: its schema is {schema}")
        return _OpenParquet(parquet)


COLUMNS = ["key", "input_ids", "weights", "json", "images"]


def _sample(table: pa.Table, row: int, checksum: int | None = None) -> Sample:
    """One row of a row group as a :class:`Sample`; :class:`ChecksumMismatch` unless its values have
    ``checksum`` (None: unchecked)."""
    images = table.column("images")[row].as_py()
    videos = table.column("videos")[row].as_py() if "videos" in table.column_names else []
    key = table.column("key")[row].as_py()
    text = table.column("json")[row].as_py()
    input_ids = np.asarray(table.column("input_ids")[row].values, dtype=np.int32)
    weights = np.asarray(table.column("weights")[row].values, dtype=np.float32)
    if checksum is not None:
        if None in (key, text) or content_checksum(key, text.encode(), input_ids, weights, images, videos) != checksum:
            raise ChecksumMismatch(key)
    return Sample(key=key, info=json.loads(text), input_ids=input_ids, weights=weights, images=images, videos=videos)


class _OpenParquet(OpenShard):
    """Random rows: a row costs the read of its row group, and the last few groups stay decoded."""

    CACHED_GROUPS = 4

    def __init__(self, parquet: pq.ParquetFile):
        self.parquet = parquet
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        self.starts = np.cumsum([0, *sizes])
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()

    def read_at(self, offset: int, size: int, checksum: int | None = None) -> Sample:
        if not 0 <= offset < self.starts[-1]:
            raise IndexError(f"row {offset} is outside the shard's {self.starts[-1]} rows")
        group = int(np.searchsorted(self.starts, offset, side="right") - 1)
        if group in self._groups:
            self._groups.move_to_end(group)
        else:
            videos = ["videos"] if "videos" in self.parquet.schema_arrow.names else []
            self._groups[group] = self.parquet.read_row_group(group, columns=COLUMNS + videos)
            if len(self._groups) > self.CACHED_GROUPS:
                self._groups.popitem(last=False)
        return _sample(self._groups[group], offset - int(self.starts[group]), checksum)
