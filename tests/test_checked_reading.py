"""Reading is checked: per-sample checksums, the manifest against itself and the index, paths inside the build."""

import hashlib
import json
import logging
import os
import shutil
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardkit.cli import main
from shardkit.errors import ShardError
from shardkit.export import export_llamafactory
from shardkit.load import ShardStream, verify_build
from shardkit.shards import read_manifest
from shardkit.stats import build_stats
from tests.bitflip import flip_bits


def copy_build(builds, fmt, tmp_path):
    copy = tmp_path / f"copy-{fmt}"
    shutil.copytree(builds[fmt], copy)
    return copy


def edit_manifest(folder, change):
    """Apply ``change`` to the manifest's JSON dict and write it back."""
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_index(folder, table):
    """Replace index.parquet with ``table`` and record it in the manifest, as a consistent edit would."""
    pq.write_table(table, folder / "index.parquet")
    data = (folder / "index.parquet").read_bytes()

    def change(manifest):
        manifest["index"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    edit_manifest(folder, change)


def read_all(folder, **options):
    return [s.key for batch in ShardStream(str(folder), batch_size=4, shuffle=False, **options) for s in batch]


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
@pytest.mark.slow
def test_no_bit_flip_is_read_back_as_different_data(builds, tmp_path, fmt):
    copy = copy_build(builds, fmt, tmp_path)
    unchecked = flip_bits(copy, 300, seed=1, checksums=False)
    assert unchecked.silent > 0  # what reading without the check did
    checked = flip_bits(copy, 300, seed=1)
    assert checked.tried == 300 and checked.silent == 0 and checked.other == 0
    assert checked.caught >= unchecked.silent and checked.caught + checked.harmless == 300


def _flip_inside_sample(folder, fmt):
    """Flip one bit in the middle of the image of the first sample of shard 1; that sample's key."""
    manifest = read_manifest(str(folder))
    path = folder / manifest.shards[1].path
    data = bytearray(path.read_bytes())
    stream = ShardStream(str(folder), batch_size=1, shuffle=False)
    first = stream.source.get(manifest.shards[0].num_samples)
    at = data.find(first.images[0]) + len(first.images[0]) // 2
    assert at > 0
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    return manifest.shards[1].path, first.key


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_a_flipped_bit_fails_every_reader_naming_shard_and_sample(builds, tmp_path, fmt, capsys):
    copy = copy_build(builds, fmt, tmp_path)
    shard, key = _flip_inside_sample(copy, fmt)
    pattern = f"{shard}: sample 5 \\(key '{key}' as read.*does not match its checksum"
    with pytest.raises(ShardError, match=pattern):
        read_all(copy)
    with pytest.raises(ShardError, match=pattern):
        build_stats(str(copy))
    with pytest.raises(ShardError, match=pattern):
        export_llamafactory(str(copy), str(tmp_path / "lf"), name="x", progress=False)
    assert main(["stats", str(copy)]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    assert len(read_all(copy, checksums=False)) == 47  # unchecked, the damage goes through unseen


def test_a_build_without_checksums_is_read_with_a_warning(builds, tmp_path, caplog):
    copy = copy_build(builds, "tar", tmp_path)
    rewrite_index(copy, pq.read_table(copy / "index.parquet").drop_columns(["checksum"]))
    with caplog.at_level(logging.WARNING):
        assert len(read_all(copy)) == 47
    assert "without per-sample checksums" in caplog.text and "shardkit verify" in caplog.text
    assert verify_build(str(copy)) == []


def test_verify_checks_the_manifest_against_itself_and_the_index(builds, tmp_path, capsys):
    copy = copy_build(builds, "tar", tmp_path)
    shard = read_manifest(str(copy)).shards[2].path
    edit_manifest(copy, lambda m: m["shards"][2].update(num_samples=4))
    problems = verify_build(str(copy))
    assert problems and "num_samples is 47, but the shards add up to 46" in problems[0]
    assert main(["verify", str(copy)]) == 1
    assert "num_samples" in capsys.readouterr().out
    with pytest.raises(ShardError, match="manifest.json is inconsistent"):
        read_all(copy)
    edit_manifest(copy, lambda m: m.update(num_samples=46) or m["index"].update(num_rows=46))  # totals agree now
    # the index still disagrees
    assert verify_build(str(copy)) == [
        f"{copy}/index.parquet does not match the manifest: 47 rows, the manifest 46 samples; "
        f"{shard} has 5 samples in the index, 4 in the manifest"
    ]
    with pytest.raises(ShardError, match=f"{shard} has 5 samples in the index, 4 in the manifest"):
        read_all(copy, verify=True)


def test_verify_checks_the_format_against_the_files(builds, tmp_path):
    copy = copy_build(builds, "parquet", tmp_path)
    edit_manifest(copy, lambda m: m.update(format="tar"))
    assert "format 'tar', but shard shard-000000-000.parquet is not a .tar file" in verify_build(str(copy))[0]
    shards = sorted(p.name for p in copy.glob("shard-*"))
    for name in shards:  # renamed to match the claimed format: the contents still do not
        os.rename(copy / name, copy / name.replace(".parquet", ".tar"))
    edit_manifest(copy, lambda m: [s.update(path=s["path"].replace(".parquet", ".tar")) for s in m["shards"]])
    problems = verify_build(str(copy))
    assert len(problems) == 10 and problems[0].endswith("is not a tar file, the format the manifest gives")
    with pytest.raises(ShardError, match="shard-000000-000.tar"):
        read_all(copy)


@pytest.mark.parametrize("path", ["../../etc/hostname", "/etc/hostname", "/dev/zero", "sub/../shard.tar", ".."])
def test_paths_outside_the_build_folder_are_refused(builds, tmp_path, path, capsys):
    copy = copy_build(builds, "tar", tmp_path)
    edit_manifest(copy, lambda m: m["shards"][0].update(path=path))
    with pytest.raises(ShardError, match="is not a file name in the build folder"):
        ShardStream(str(copy), batch_size=1)
    assert main(["verify", str(copy)]) == 2
    assert "is not a file name in the build folder" in capsys.readouterr().err


def _finishes(target, *args, seconds=20):
    result = {}

    def run():
        try:
            result["value"] = target(*args)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{target.__name__} did not finish"
    return result


def test_verify_reads_no_further_than_each_file_should_be(builds, tmp_path):
    copy = copy_build(builds, "tar", tmp_path)
    shards = [copy / s.path for s in read_manifest(str(copy)).shards]
    shards[0].unlink()
    shards[0].symlink_to("/dev/zero")
    shards[1].unlink()
    os.mkfifo(shards[1])
    with open(shards[2], "r+b") as f:
        f.truncate(8 << 30)  # sparse, 8 GiB
    problems = _finishes(verify_build, str(copy))["value"]
    assert f"{shards[0]} is not a regular file" in problems[0]
    assert f"{shards[1]} is not a regular file" in problems[1]
    assert "has more than" in problems[2] and "truncated or replaced" in problems[2]
    error = _finishes(read_all, copy)["error"]
    assert isinstance(error, ShardError) and "is not a regular file" in str(error)


def test_index_damage_is_a_shard_error_even_with_verify(builds, tmp_path):
    copy = copy_build(builds, "tar", tmp_path)
    table = pq.read_table(copy / "index.parquet")
    index = copy / "index.parquet"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01
    index.write_bytes(bytes(data))
    for verify in (False, True):
        with pytest.raises(ShardError, match="index.parquet does not match its sha256"):
            read_all(copy, verify=verify)
    rewrite_index(copy, table.drop_columns(["num_tokens"]))
    with pytest.raises(ShardError, match="not a valid sample index: no column 'num_tokens'"):
        read_all(copy, verify=True)
    offsets = table.column("offset").to_pylist()
    offsets[3] = 10**9
    rewrite_index(copy, table.set_column(1, "offset", [offsets]))
    with pytest.raises(ShardError, match="sample byte ranges outside their shard"):
        read_all(copy, verify=True)
    shards = table.column("shard").to_pylist()
    shards[-1] = 99
    rewrite_index(copy, table.set_column(0, "shard", pa.array(shards, pa.int32())))
    with pytest.raises(ShardError, match="shard numbers out of order or out of range"):
        read_all(copy)
