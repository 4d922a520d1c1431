"""Reading is checked: per-sample checksums, the manifest against itself and the index, paths inside the build."""

import hashlib
import json
import logging
import os
import re
import shutil
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardkit.cli import main
from shardkit.errors import (
    ConfigError,
    ShardAccessError,
    ShardCorruptError,
    ShardError,
    ShardMissingError,
    ShardNetworkError,
)
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
    with pytest.raises(ShardCorruptError, match=pattern):
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


@pytest.mark.parametrize(
    "field, value, own",
    [
        ("image_mean", [0.5, 0.5, 0.5], "[0.48145466, 0.4578275, 0.40821073]"),
        ("patch_size", 16, "14"),
        ("name", "qwen3_vl", None),
    ],
)
def test_a_hand_edited_family_is_refused_naming_the_field(builds, tmp_path, capsys, field, value, own):
    copy = copy_build(builds, "tar", tmp_path)
    edit_manifest(copy, lambda m: m["config"]["family"].update({field: value}))
    if own is None:  # another family's name on this family's constants: its grid is not this one
        expected = "config.family.image_mean is [0.48145466, 0.4578275, 0.40821073], but qwen3_vl's own is [0.5, 0.5"
    else:
        expected = f"config.family.{field} is {json.dumps(value)}, but qwen2_vl's own is {own}"
    assert main(["verify", str(copy)]) == 1
    assert expected in capsys.readouterr().out
    with pytest.raises(ShardError, match=re.escape(expected)):
        read_all(copy)  # every batch's pixel_values would have been normalised (or cut) by the edited value
    assert main(["stats", str(copy)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and expected in err


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


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_a_missing_shard_is_missing_not_corrupt(builds, tmp_path, fmt):
    copy = copy_build(builds, fmt, tmp_path)
    stream = ShardStream(str(copy), batch_size=4, shuffle=False)
    shard = read_manifest(str(copy)).shards[2].path
    (copy / shard).unlink()
    with pytest.raises(ShardMissingError, match=f"{shard} is missing") as caught:
        list(stream)
    assert isinstance(caught.value, FileNotFoundError) and "corrupt" not in str(caught.value)
    (copy / "index.parquet").unlink()
    with pytest.raises(ShardMissingError, match="index.parquet is missing"):
        ShardStream(str(copy), batch_size=4)


def test_an_unreachable_build_is_a_network_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ShardNetworkError, match=f"127.0.0.1:{port}/build/manifest.json cannot be read: network error"):
        ShardStream(f"http://127.0.0.1:{port}/build", batch_size=1)


def test_no_permission_or_credentials_is_an_access_error():
    from botocore.exceptions import NoCredentialsError

    from shardkit.shards.files import reading_error

    error = reading_error(NoCredentialsError(), "s3://bucket/b/shard-000000-000.tar")
    assert isinstance(error, ShardAccessError) and isinstance(error, PermissionError)
    assert "s3://bucket/b/shard-000000-000.tar cannot be read: no usable credentials" in str(error)
    assert "AWS_ACCESS_KEY_ID" in str(error)
    denied = reading_error(PermissionError(13, "Permission denied"), "b/shard.tar")
    assert isinstance(denied, ShardAccessError) and "b/shard.tar cannot be read: permission denied" in str(denied)
    assert reading_error(ValueError("bad bytes"), "b/shard.tar") is None  # the data's fault: the caller's call


def _keys(batch):
    return [s.key for s in batch]


def test_on_error_raise_names_the_shard_and_key_and_skip_drops_and_counts_the_sample(builds, tmp_path, caplog):
    from shardkit.load.torch import TorchLoader

    copy = copy_build(builds, "tar", tmp_path)
    clean = [k for b in TorchLoader(ShardStream(str(copy), batch_size=4, seed=2), collate=_keys) for k in b]
    shard, key = _flip_inside_sample(copy, "tar")

    def loader(workers=0, **options):
        return TorchLoader(ShardStream(str(copy), batch_size=4, seed=2, **options), collate=_keys, num_workers=workers)

    for workers in (0, 2):  # the error crosses from a DataLoader worker intact
        with pytest.raises(ShardCorruptError, match=f"{shard}: sample 5 \\(key '{key}' as read"):
            list(loader(workers))
    with caplog.at_level(logging.WARNING, logger="shardkit.load.stream"):
        read = [k for b in loader(on_error="skip") for k in b]
    assert shard in caplog.text and key in caplog.text and "on_error='skip'" in caplog.text  # logged in this process
    assert read == [k for k in clean if k != key]  # the rest, in the same batches and order

    for workers in (0, 2):  # the count comes back from DataLoader workers, and survives a resume
        skipping = loader(workers, on_error="skip")
        assert [k for b in skipping for k in b] == read
        assert skipping.stream.skipped == {"corrupt": 1} and skipping.state_dict()["skipped"] == {"corrupt": 1}
        first = loader(workers, on_error="skip")
        taken = []
        for batch in first:
            taken += batch
            if key in clean[: len(taken)]:  # past the damaged sample
                break
        state = json.loads(json.dumps(first.state_dict()))
        assert state["skipped"] == {"corrupt": 1}
        second = loader(workers, on_error="skip")
        second.load_state_dict(state)
        assert taken + [k for b in second for k in b] == read and second.stream.skipped == {"corrupt": 1}


def test_on_error_skip_drops_a_missing_shard_and_still_raises_for_the_setup(builds, tmp_path):
    copy = copy_build(builds, "parquet", tmp_path)
    manifest = read_manifest(str(copy))
    (copy / manifest.shards[2].path).unlink()
    stream = ShardStream(str(copy), batch_size=4, seed=2, on_error="skip")
    read = [s.key for batch in stream for s in batch]
    assert len(read) == manifest.num_samples - manifest.shards[2].num_samples
    assert stream.skipped == {"missing": manifest.shards[2].num_samples}
    with pytest.raises(ShardError, match="dropped every sample of a batch"):
        list(ShardStream(str(copy), batch_size=5, shuffle=False, on_error="skip"))  # shard 2 alone fills a batch
    with pytest.raises(ConfigError, match="on_error must be 'raise' or 'skip'"):
        ShardStream(str(copy), batch_size=4, on_error="ignore")
