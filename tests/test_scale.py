"""Scale and resilience of the build: worker processes, a real Ray head, a real SIGKILL."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.load import ShardStream
from shardkit.shards import read_manifest
from shardkit.synthetic import make_clinical_dataset
from tests.helpers import free_port


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


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
@pytest.mark.slow
def test_a_small_input_is_converted_in_slices_with_the_same_bytes(clinical, tmp_path, monkeypatch, fmt):
    """One task (fewer tasks than workers): its slices are converted on the workers, its shard written here; the
    bytes are those of one process, whatever the number of workers, and the rejects are the same."""
    import shardkit.build as build_module

    plans = []
    real = build_module.plan_slices
    monkeypatch.setattr(build_module, "plan_slices", lambda *args: plans.append(real(*args)) or plans[-1])
    builds = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        config = make_config(clinical, out, format=fmt).model_copy(update={"samples_per_shard": 1000})
        builds[workers] = build(config, progress=False, workers=workers)
    assert [len(plan) for plan in plans] == [4, 6]  # two slices a worker for workers 2 and 3; none for 1
    reference = tmp_path / "w1"
    for workers in (2, 3):
        assert shard_hashes(tmp_path / f"w{workers}") == shard_hashes(reference)
        for name in ("rejects.jsonl", "index.parquet"):
            assert (tmp_path / f"w{workers}" / name).read_bytes() == (reference / name).read_bytes()
        assert builds[workers].num_rejected == len(clinical.bad_lines)


@pytest.mark.slow
def test_strict_stops_at_the_first_rejected_record_of_a_sliced_task(clinical, tmp_path):
    from shardkit.errors import RecordError

    config = make_config(clinical, tmp_path / "out").model_copy(update={"samples_per_shard": 1000})
    with pytest.raises(RecordError) as info:
        build(config, strict=True, progress=False, workers=2)
    assert info.value.line == min(clinical.bad_lines)
    assert not list((tmp_path / "out").glob("shard-*"))


@dataclass(frozen=True)
class RayHead:
    address: str
    env: dict[str, str]  # what a driver on this machine starts from: no token mode set


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head with token authentication and 2 CPUs, kept to itself: 127.0.0.1 only, its session files in
    a temp dir, its token in HOME/.ray/auth_token under a HOME of its own (as on a machine where someone ran
    ``ray get-auth-token --generate``), none of this machine's RAY_* settings. Stopped after the module."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    home, temp = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("ray")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray then keeps 127.0.0.1 as given instead of replacing it with the
    # machine's network address, for the head and for the driver
    env |= {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port = free_port()
    log = temp / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
            stdout=out, stderr=subprocess.STDOUT, env={**env, "RAY_AUTH_MODE": "token"}, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield RayHead(f"127.0.0.1:{port}", env)
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of its process group is left


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine_on_a_cluster_with_token_authentication(clinical, tmp_path, ray_head):
    build(make_config(clinical, tmp_path / "local"), progress=False)

    def build_on_ray(out, samples_per_shard=3, **env):
        command = [sys.executable, "-m", "shardkit.cli", "-q", "build", str(clinical.jsonl), "--out", str(out),
                   "--samples-per-shard", str(samples_per_shard), "--engine", "ray", "--ray-address", ray_head.address,
                   "--workers", "2", "--no-progress"]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, env={**ray_head.env, **env}, timeout=600)

    # the token is in HOME/.ray/auth_token, but Ray sends it to a given address only with RAY_AUTH_MODE=token
    refused = build_on_ray(tmp_path / "refused")
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("shardkit: ")]  # Ray logs its own too
    assert errors == [
        f"shardkit: error: the Ray cluster at {ray_head.address} requires token authentication: set "
        "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH, or in "
        "~/.ray/auth_token"
    ], refused.stderr[-3000:]

    done = build_on_ray(tmp_path / "ray", RAY_AUTH_MODE="token")
    assert done.returncode == 0, done.stderr[-3000:]
    assert shard_hashes(tmp_path / "ray") == shard_hashes(tmp_path / "local")
    assert read_manifest(str(tmp_path / "ray")).num_rejected == len(clinical.bad_lines)
    assert (tmp_path / "ray" / "index.parquet").read_bytes() == (tmp_path / "local" / "index.parquet").read_bytes()

    # one task for two workers: its slices converted as Ray tasks, its shard written by the driver
    build(make_config(clinical, tmp_path / "local-one").model_copy(update={"samples_per_shard": 1000}), progress=False)
    done = build_on_ray(tmp_path / "ray-one", 1000, RAY_AUTH_MODE="token")
    assert done.returncode == 0, done.stderr[-3000:]
    assert shard_hashes(tmp_path / "ray-one") == shard_hashes(tmp_path / "local-one")
    assert (tmp_path / "ray-one" / "rejects.jsonl").read_bytes() == (
        tmp_path / "local-one" / "rejects.jsonl"
    ).read_bytes()


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
