"""Single-bit flips in small real shards (tar and Parquet), each read back through the loader.

For each format, the same random bits (fixed seed) are flipped one at a time in one shard and every sample of
that shard is read: with per-sample checksums (the default) and without. A flip is ``caught`` (ShardError),
``silent`` (read back as different data, no error), ``harmless`` (outside every sample: read back identical) or
``other`` (any other exception). Checked reading must leave 0 silent and 0 other.

    python benchmarks/fuzz_bitflips.py [FLIPS]      # default 5000 per format and mode; results/fuzz.json
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from common import WORK, machine, save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.bitflip, shared with the test

from shardkit.build import build  # noqa: E402
from shardkit.config import BuildConfig  # noqa: E402
from shardkit.synthetic import make_clinical_dataset  # noqa: E402
from tests.bitflip import flip_bits  # noqa: E402


def main(flips: int = 5000) -> dict:
    root = WORK / "fuzz"
    shutil.rmtree(root, ignore_errors=True)
    data = make_clinical_dataset(root / "data", cases=12, seed=7, megapixels=(0.004, 0.02), images_per_case=(1, 3))
    report = {"flips_per_run": flips}
    for fmt in ("tar", "parquet"):
        out = root / fmt
        build(BuildConfig.create(input=str(data.jsonl), out=str(out), format=fmt, samples_per_shard=6), progress=False)
        shard = next(out.glob(f"shard-000000-000.{fmt}"))
        report[fmt] = {"shard_bytes": shard.stat().st_size}
        for mode, checksums in (("unchecked", False), ("checked", True)):
            started = time.perf_counter()
            counts = flip_bits(out, flips, seed=0, checksums=checksums)
            report[fmt][mode] = {**counts.as_dict(), "seconds": round(time.perf_counter() - started, 1)}
            print(fmt, mode, report[fmt][mode], flush=True)
    return report


if __name__ == "__main__":
    result = {"machine": machine(), "fuzz": main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)}
    save("fuzz", result)
