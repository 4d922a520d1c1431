"""The sample index: where each sample lies and how long it is, for every shard.

``DIR/index.parquet`` has one row per sample, in manifest order, with
``shard`` (its shard's position in the manifest), ``offset`` and ``size``
(tar: the byte range of its members; Parquet: its row and 1), ``num_tokens``
and ``checksum`` (xxh3-64 of the sample as stored, checked on every read;
builds made before it existed have none). Loaders use it to seek straight to a
sample (resuming deep into an epoch costs no re-reading) and to plan
token-budget batches without reading any data. About 20 bytes per sample
compressed.

Opening a build checks the index against the manifest: its sha256, and that it
agrees with the shards (sample and token counts, locations inside each shard),
so a damaged or edited build fails with a :class:`ShardError` saying what does
not match, before any sample is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.errors import ShardError
from shardkit.shards.files import read_checked
from shardkit.storage import HashingWriter, join

if TYPE_CHECKING:
    from shardkit.shards.manifest import Manifest

logger = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"


@dataclass(frozen=True)
class SampleIndex:
    """Per-sample arrays of a build, indexed by sample id (position in manifest order)."""

    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    num_tokens: np.ndarray
    checksum: np.ndarray | None = None  # None: a build made before per-sample checksums

    def __len__(self) -> int:
        return len(self.shard)


SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("num_tokens", pa.int32()),
        ("checksum", pa.uint64()),
    ]
)


def _column(values: np.ndarray, type: pa.DataType) -> pa.Array:
    """A numpy column as an Arrow array over its buffer (``pa.array`` would import pandas, to ask whether
    ``values`` is a pandas Series: a third of a second at a build's start)."""
    return pa.Array.from_buffers(type, len(values), [None, pa.py_buffer(np.ascontiguousarray(values))])


class IndexWriter:
    """Writes the index into an open binary file, a row group per million samples (bounded memory)."""

    FLUSH_ROWS = 1 << 20

    def __init__(self, f: Any):
        self._hashed = HashingWriter(f)
        self._writer = pq.ParquetWriter(self._hashed, SCHEMA, compression="zstd")
        self._pending: list[tuple[int, list[tuple[int, int, int]], list[int]]] = []
        self._pending_rows = 0
        self.rows = 0

    def add(self, shard: int, locations: list[tuple[int, int, int]], tokens: list[int]) -> None:
        """Append the samples of shard number ``shard`` (manifest order); ``locations`` are
        ``(offset, size, checksum)``."""
        self._pending.append((shard, locations, tokens))
        self._pending_rows += len(tokens)
        if self._pending_rows >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        counts = [len(tokens) for _, _, tokens in self._pending]
        rows = [loc for _, locs, _ in self._pending for loc in locs]
        columns = {
            "shard": np.repeat(np.asarray([s for s, _, _ in self._pending], dtype=np.int32), counts),
            "offset": np.asarray([r[0] for r in rows], dtype=np.int64),
            "size": np.asarray([r[1] for r in rows], dtype=np.int64),
            "num_tokens": np.asarray([t for _, _, tokens in self._pending for t in tokens], dtype=np.int32),
            "checksum": np.asarray([r[2] for r in rows], dtype=np.uint64),
        }
        table = pa.Table.from_arrays([_column(columns[f.name], f.type) for f in SCHEMA], schema=SCHEMA)
        self._writer.write_table(table)
        self.rows += table.num_rows
        self._pending, self._pending_rows = [], 0

    def close(self) -> dict[str, Any]:
        """Finish the file; its manifest entry."""
        self._flush()
        self._writer.close()
        return {
            "path": INDEX_NAME,
            "num_rows": self.rows,
            "bytes": self._hashed.bytes,
            "sha256": self._hashed.sha256.hexdigest(),
        }


def read_index(fs: Any, folder: str, manifest: Manifest) -> SampleIndex:
    """Read ``DIR/index.parquet``, checked against ``manifest``; :class:`ShardError` saying what does not match."""
    path = join(folder, manifest.index.path)
    index = load_index(fs, path, manifest.index)
    if problems := index_problems(index, manifest):
        raise ShardError(f"{path} does not match the manifest: {'; '.join(problems)}")
    if index.checksum is None:
        logger.warning(
            "%s was built without per-sample checksums: its samples are read unchecked; rebuild it, or run "
            "`shardkit verify` to check every shard against the manifest's sha256",
            folder,
        )
    return index


def load_index(fs: Any, path: str, entry: Any) -> SampleIndex:
    """The index file at ``path``, checked against its manifest ``entry`` (size and sha256) and parsed."""
    data = read_checked(fs, path, entry.bytes, entry.sha256, keep=True)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:
        raise ShardError(f"{path} is not a valid sample index: {exc}") from None
    columns = {}
    for field in SCHEMA:
        if field.name not in table.column_names:
            if field.name == "checksum":
                continue
            raise ShardError(f"{path} is not a valid sample index: no column {field.name!r}")
        column = table.column(field.name)
        if column.type != field.type or column.null_count:
            raise ShardError(f"{path} is not a valid sample index: column {field.name!r} is not {field.type}, no nulls")
        columns[field.name] = column.to_numpy()
    return SampleIndex(**columns)


def index_problems(index: SampleIndex, manifest: Manifest) -> list[str]:
    """How the index disagrees with the manifest's shards (empty: it agrees)."""
    shards = manifest.shards
    problems = []
    if len(index) != manifest.num_samples:
        problems.append(f"{len(index)} rows, the manifest {manifest.num_samples} samples")
    if len(index) and (np.any(np.diff(index.shard) < 0) or index.shard.min() < 0 or index.shard.max() >= len(shards)):
        return [*problems, "shard numbers out of order or out of range"]
    counts = np.bincount(index.shard, minlength=len(shards))
    tokens = np.bincount(index.shard, weights=index.num_tokens, minlength=len(shards))
    for number, shard in enumerate(shards):
        if counts[number] != shard.num_samples:
            found = int(counts[number])
            problems.append(f"{shard.path} has {found} samples in the index, {shard.num_samples} in the manifest")
        elif tokens[number] != shard.num_tokens:
            found = int(tokens[number])
            problems.append(f"{shard.path} has {found} tokens in the index, {shard.num_tokens} in the manifest")
    if np.any(index.num_tokens < 1):
        problems.append("samples without tokens")
    if manifest.format == "parquet":
        starts = np.concatenate([[0], np.cumsum(counts)])[index.shard]
        if np.any(index.offset != np.arange(len(index)) - starts) or np.any(index.size != 1):
            problems.append("rows that are not the shards' rows in order")
    else:
        ends = np.asarray([s.bytes for s in shards], dtype=np.int64)[index.shard] if len(index) else index.offset
        if np.any(index.offset < 0) or np.any(index.size < 1) or np.any(index.offset + index.size > ends):
            problems.append("sample byte ranges outside their shard")
    return problems
