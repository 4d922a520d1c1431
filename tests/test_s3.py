"""Object storage: input, images and output on a real S3 API server (moto's server mode on 127.0.0.1)."""

import json
import subprocess
import sys

import pytest

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.load import ShardStream, verify_build
from shardkit.load.torch import TorchLoader
from shardkit.shards import read_manifest
from tests.helpers import S3_SECRET as SECRET


@pytest.mark.slow
def test_build_from_and_to_s3_then_stream_it(s3, clinical, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for path in clinical.root.rglob("*"):
        if path.is_file() and not path.is_symlink():  # object stores have no symbolic links
            fs.put_file(str(path), f"bucket/data/{path.relative_to(clinical.root)}")
    assert fs.exists("bucket/data/train_structured.jsonl")

    source = "s3://bucket/data/train_structured.jsonl"
    command = [sys.executable, "-m", "shardkit.cli", "build", source, "--out", "s3://bucket/shards",
               "--samples-per-shard", "4", "--workers", "2", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    manifest = read_manifest("s3://bucket/shards")
    assert manifest.num_samples == len(clinical.good_lines)
    rejects = [json.loads(line) for line in fs.cat("bucket/shards/rejects.jsonl").splitlines()]
    expected = dict(clinical.bad_lines)
    symlink_line = next(r["line"] for r in rejects if r.get("image") == "images/bad_symlink_out.jpg")
    expected[symlink_line] = "image_missing"  # the link was not uploaded
    assert {r["line"]: r["code"] for r in rejects} == expected
    assert fs.exists("bucket/shards/_progress")  # task results kept: a rerun re-checks the images
    assert verify_build("s3://bucket/shards") == []

    # the same bytes as a local build of the same data
    local = build(
        BuildConfig.create(input=str(clinical.jsonl), out=str(tmp_path / "local"), samples_per_shard=4), progress=False
    )
    assert [(s.path, s.sha256) for s in manifest.shards] == [(s.path, s.sha256) for s in local.shards]

    stream = ShardStream("s3://bucket/shards", batch_size=3, seed=1)
    keys = sorted(s.key for batch in stream for s in batch)
    assert keys == sorted(f"{line:010d}" for line in clinical.good_lines)
    # DataLoader worker processes each open the bucket themselves
    loader = TorchLoader(ShardStream("s3://bucket/shards", batch_size=3, seed=1), collate=lambda b: [s.key for s in b],
                         num_workers=2)  # fmt: skip
    assert sorted(k for batch in loader for k in batch) == keys
    # whole shards cached on local disk at first use (what docs/SCALING.md recommends for training)
    cache = tmp_path / "cache"
    cached = ShardStream("simplecache::s3://bucket/shards", batch_size=3, seed=1)
    cached.source.fs.storage = [str(cache)]
    assert sorted(s.key for batch in cached for s in batch) == keys
    assert len(list(cache.iterdir())) >= len(manifest.shards)


def test_remote_image_paths_cannot_leave_the_root(s3):
    from shardkit.errors import RecordError
    from shardkit.images import ImageRoot

    root = ImageRoot("s3://bucket/data")
    assert root.resolve("images/a.jpg") == "bucket/data/images/a.jpg"
    assert root.resolve("s3://bucket/data/images/a.jpg") == "bucket/data/images/a.jpg"
    for ref in ["../other/a.jpg", "/etc/passwd", "s3://bucket/other/a.jpg", "s3://bucket/data/../x.jpg"]:
        with pytest.raises(RecordError) as info:
            root.resolve(ref)
        assert info.value.code == "image_outside_root", ref
