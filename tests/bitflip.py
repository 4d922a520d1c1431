"""Single-bit flips in a real shard, each read back through the loader: caught, silent or harmless.

Used by tests/test_checked_reading.py (a few hundred flips) and benchmarks/fuzz_bitflips.py (the full figures).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shardkit.errors import ShardError
from shardkit.load.source import BuildSource
from shardkit.shards import Sample, read_manifest


@dataclass
class FlipCounts:
    """What happened to the flips: ``caught`` by a ShardError, read back as ``silent``-ly different data,
    ``harmless`` (read back identical: the bit lies outside every sample), or an ``other`` exception."""

    tried: int = 0
    caught: int = 0
    silent: int = 0
    harmless: int = 0
    other: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _content(sample: Sample) -> tuple:
    return (
        sample.key,
        json.dumps(sample.info, sort_keys=True),
        sample.input_ids.dtype.str,
        sample.input_ids.tobytes(),
        sample.weights.dtype.str,
        sample.weights.tobytes(),
        tuple(sample.images),
    )


def flip_bits(build: str | Path, flips: int, *, seed: int = 0, shard: int = 0, checksums: bool = True) -> FlipCounts:
    """Flip ``flips`` distinct random bits of shard number ``shard`` of ``build``, one at a time, reading every
    sample of that shard after each; the shard is restored at the end."""
    source = BuildSource(str(build), checksums=checksums)
    path = Path(build) / read_manifest(str(build)).shards[shard].path
    ids = np.flatnonzero(source.index.shard == shard).tolist()
    expected = [_content(source.get(i)) for i in ids]
    source.close()
    original = path.read_bytes()
    counts = FlipCounts()
    bits = np.random.default_rng(seed).choice(len(original) * 8, size=min(flips, len(original) * 8), replace=False)
    try:
        for bit in bits.tolist():
            damaged = bytearray(original)
            damaged[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(damaged)
            counts.tried += 1
            try:
                got = [_content(source.get(i)) for i in ids]
            except ShardError:
                counts.caught += 1
            except Exception:
                counts.other += 1
            else:
                if got == expected:
                    counts.harmless += 1
                else:
                    counts.silent += 1
            finally:
                source.close()
    finally:
        path.write_bytes(original)
    return counts
