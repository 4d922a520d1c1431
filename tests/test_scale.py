"""Scale and resilience of the build: worker processes, a real Ray head, a real SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.load import ShardStream
from shardkit.shards import read_manifest
from shardkit.synthetic import make_clinical_dataset
from tests.conftest import free_port


def shard_hashes(folder):
    return [(s.path, s.sha256) for s in read_manifest(str(folder)).shards]


def make_config(dataset, out, **options):
    return BuildConfig.create(input=str(dataset.jsonl), out=str(out), samples_per_shard=3, **options)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
@pytest.mark.slow
def test_worker_processes_give_byte_identical_shards(clinical, tmp_path, fmt):
    one = build(make_config(clinical, tmp_path / "one", format=fmt), progress=False, workers=1)
    two = build(make_config(clinical, tmp_path / "two", format=fmt), progress=False, workers=2)
    assert shard_hashes(tmp_path / "one") == shard_hashes(tmp_path / "two")
    assert one.index == two.index and one.num_rejected == two.num_rejected == len(clinical.bad_lines)
    assert (tmp_path / "one" / "rejects.jsonl").read_bytes() == (tmp_path / "two" / "rejects.jsonl").read_bytes()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head on 127.0.0.1 with 2 CPUs, started for this test and stopped after it."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        check=True, capture_output=True, env=env, timeout=180,
    )  # fmt: skip
    yield f"127.0.0.1:{port}"
    subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine(clinical, tmp_path, ray_head):
    build(make_config(clinical, tmp_path / "local"), progress=False)
    manifest = build(
        make_config(clinical, tmp_path / "ray"), progress=False, engine="ray", ray_address=ray_head, workers=2
    )
    assert shard_hashes(tmp_path / "ray") == shard_hashes(tmp_path / "local")
    assert manifest.num_rejected == len(clinical.bad_lines)
    assert (tmp_path / "ray" / "index.parquet").read_bytes() == (tmp_path / "local" / "index.parquet").read_bytes()


@pytest.mark.slow
def test_a_build_killed_with_sigkill_finishes_when_run_again(tmp_path):
    data = make_clinical_dataset(tmp_path / "data", cases=60, seed=8, megapixels=(0.2, 0.6), bad_lines=True)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "shardkit.cli", "-q", "build", str(data.jsonl), "--out", str(out),
               "--samples-per-shard", "3", "--workers", "2", "--no-progress"]  # fmt: skip
    run = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = out / "_progress"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(progress.glob("task-*.json"))) < 4:
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the whole process group: the build and its workers
    run.wait()
    assert not (out / "manifest.json").exists()
    finished = [json.loads(p.read_text()) for p in progress.glob("task-*.json")]
    kept = {s["path"]: (out / s["path"]).stat() for r in finished for s in r["shards"]}
    assert kept

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for name, before in kept.items():  # finished shards were not rewritten
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    keys = [s.key for batch in ShardStream(str(out), batch_size=7, shuffle=False) for s in batch]
    assert keys == [f"{line:010d}" for line in data.good_lines]  # every good record, once, nothing else
    rejects = [json.loads(line)["line"] for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == sorted(data.bad_lines)
    assert not list(out.glob("*.partial")) and progress.is_dir()  # task results kept: a rerun re-checks images

    clean = tmp_path / "clean"
    shutil.rmtree(clean, ignore_errors=True)
    build(BuildConfig.create(input=str(data.jsonl), out=str(clean), samples_per_shard=3), progress=False)
    assert shard_hashes(out) == shard_hashes(clean)
