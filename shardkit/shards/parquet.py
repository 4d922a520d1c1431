"""Parquet shards with the same content as the tar shards, as columns.

Columns: ``key`` (string), ``line`` (int64), ``num_tokens`` (int32),
``input_ids`` (list<int32>), ``weights`` (list<float32>), ``images``
(list<binary>, JPEG) and ``json`` (the same JSON as the tar's ``KEY.json``).
Readable by pyarrow and Hugging Face ``datasets``. Row groups hold
:data:`ROWS_PER_GROUP` samples, so a reader can start mid-shard without
reading what comes before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.shards.base import OpenShard, Sample, ShardReader, ShardWriter

ROWS_PER_GROUP = 64

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


class ParquetShardWriter(ShardWriter):
    format = "parquet"
    suffix = ".parquet"

    def __init__(self, fs: Any, path: str):
        super().__init__(fs, path)
        self._writer = pq.ParquetWriter(
            self._hashed,
            SCHEMA,
            compression={
                "key": "zstd",
                "line": "zstd",
                "num_tokens": "zstd",
                "input_ids": "zstd",
                "weights": "zstd",
                "images": "none",
                "json": "zstd",
            },
            use_dictionary=False,
            write_statistics=["key", "line", "num_tokens"],
        )
        self._rows: list[Sample] = []

    def write(self, sample: Sample) -> None:
        self.locations.append((self.num_samples, 1))
        self._rows.append(sample)
        if len(self._rows) >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows = self._rows
        table = pa.table(
            {
                "key": [s.key for s in rows],
                "line": [s.info.get("line") for s in rows],
                "num_tokens": [len(s.input_ids) for s in rows],
                "input_ids": [s.input_ids for s in rows],
                "weights": [s.weights for s in rows],
                "images": [s.images for s in rows],
                "json": [s.info_json().decode() for s in rows],
            },
            schema=SCHEMA,
        )
        self._writer.write_table(table, row_group_size=len(rows))
        self._rows = []

    def _finish(self) -> None:
        self._flush()
        self._writer.close()


class ParquetShardReader(ShardReader):
    format = "parquet"

    def open(self, f: Any) -> OpenShard:
        return _OpenParquet(pq.ParquetFile(f))

    def samples(self, f: Any, *, images: bool = True, start: int = 0) -> Iterator[Sample]:
        yield from self._rows(pq.ParquetFile(f), images=images, start=start)

    @staticmethod
    def _rows(parquet: pq.ParquetFile, *, images: bool, start: int, stop: int | None = None) -> Iterator[Sample]:
        columns = ["key", "input_ids", "weights", "json"] + (["images"] if images else [])
        stop = parquet.metadata.num_rows if stop is None else stop
        first = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if first + rows <= start:
                first += rows
                continue
            if first >= stop:
                return
            table = parquet.read_row_group(group, columns=columns)
            keys = table.column("key").to_pylist()
            infos = table.column("json").to_pylist()
            ids = table.column("input_ids")
            weights = table.column("weights")
            pictures = table.column("images").to_pylist() if images else None
            for i in range(max(0, start - first), min(rows, stop - first)):
                yield Sample(
                    key=keys[i],
                    info=json.loads(infos[i]),
                    input_ids=np.asarray(ids[i].values, dtype=np.int32),
                    weights=np.asarray(weights[i].values, dtype=np.float32),
                    images=pictures[i] if pictures is not None else [],
                )
            first += rows


class _OpenParquet(OpenShard):
    """Reads whole row groups and keeps the last one, so neighbouring rows cost one read."""

    def __init__(self, parquet: pq.ParquetFile):
        self.parquet = parquet
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        self.starts = np.cumsum([0, *sizes])
        self._group: int | None = None
        self._rows: list[Sample] = []

    def read_at(self, offset: int, size: int) -> Sample:
        if not 0 <= offset < self.starts[-1]:
            raise IndexError(f"row {offset} is outside the shard's {self.starts[-1]} rows")
        group = int(np.searchsorted(self.starts, offset, side="right") - 1)
        if group != self._group:
            first = int(self.starts[group])
            self._rows = list(
                ParquetShardReader._rows(self.parquet, images=True, start=first, stop=int(self.starts[group + 1]))
            )
            self._group = group
        return self._rows[offset - int(self.starts[group])]
