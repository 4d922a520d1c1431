"""User and environment errors end a build with one line and exit 2, never a traceback; a rerun resumes.

Real faults: a read-only and a full file system (tmpfs mounts where the test may mount, else skipped or a
read-only folder), a worker process killed with SIGKILL, a second build into a folder another holds, an
unreachable server, an object store without credentials.
"""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from shardkit.build import build
from shardkit.cli import main
from shardkit.config import BuildConfig
from shardkit.shards import read_manifest
from shardkit.shards.folder import lock
from shardkit.storage import open_fs
from shardkit.synthetic import make_clinical_dataset
from tests.helpers import free_port


def shardkit(*args, env=None, timeout=600):
    command = [sys.executable, "-m", "shardkit.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(result):
    """The run failed with exit 2 and said why on one line, with no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("shardkit: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a tmpfs of a given size (and options) at a new folder; skipped where mounting is not allowed."""
    mounted = []

    def mount(name, size, *options):
        target = tmp_path / name
        target.mkdir()
        opts = ",".join([f"size={size}", *options])
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def test_read_only_output_is_one_line(clinical, tmp_path, mount_tmpfs):
    if os.geteuid() == 0:
        out = mount_tmpfs("ro", "1m", "ro")  # root writes through permission bits: a read-only mount
    else:
        out = tmp_path / "ro"
        out.mkdir(mode=0o555)
    line = one_line_error(shardkit("build", clinical.jsonl, "--out", out / "shards", "--no-progress"))
    assert "Read-only file system" in line or "Permission denied" in line
    assert str(out / "shards") in line


@pytest.mark.slow
def test_disk_full_is_one_line_and_a_rerun_after_freeing_space_resumes(clinical, tmp_path, mount_tmpfs):
    options = ["--samples-per-shard", "2", "--workers", "1", "--no-progress"]
    reference = tmp_path / "reference"
    build(BuildConfig.create(input=str(clinical.jsonl), out=str(reference), samples_per_shard=2), progress=False)
    size = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    disk = mount_tmpfs("disk", size // 2)
    line = one_line_error(shardkit("build", clinical.jsonl, "--out", disk / "shards", *options))
    assert "No space left on device" in line and "run the same command again" in line
    kept = {p.name: p.stat().st_mtime_ns for p in (disk / "shards").glob("shard-*.tar")}
    assert kept and not (disk / "shards" / "manifest.json").exists()
    subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(disk)], check=True)
    result = shardkit("build", clinical.jsonl, "--out", disk / "shards", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: (disk / "shards" / p).stat().st_mtime_ns for p in kept} == kept  # finished shards kept
    built = [(s.path, s.sha256) for s in read_manifest(str(disk / "shards")).shards]
    assert built == [(s.path, s.sha256) for s in read_manifest(str(reference)).shards]


class HeldImage(http.server.BaseHTTPRequestHandler):
    """Serves one image, but only once the test releases it: until then the build worker that asked holds an
    unfinished task, blocked on a socket the test can see."""

    image: bytes
    asked = threading.Event()
    release = threading.Event()

    def do_GET(self):
        type(self).asked.set()
        type(self).release.wait(300)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args):
        pass


def worker_asking(build_pid: int, port: int) -> int:
    """The build's worker process holding a connection to the test's server on ``port``."""
    for child in psutil.Process(build_pid).children(recursive=True):
        try:
            if any(c.raddr and c.raddr.port == port for c in child.net_connections(kind="tcp")):
                return child.pid
        except psutil.NoSuchProcess:
            pass
    raise AssertionError("no worker of the build holds the connection to the image server")


@pytest.mark.slow
def test_a_killed_worker_is_one_line_and_a_rerun_resumes(tmp_path):
    """A worker killed while it holds an unfinished task (blocked downloading an image from the test's server) ends
    the build with one line; the same command then builds everything, that record included."""
    data = make_clinical_dataset(tmp_path / "data", cases=16, seed=1, megapixels=(0.2, 0.4))
    lines = data.jsonl.read_text().splitlines()
    record = json.loads(lines[9])
    part = record["messages"][0]["content"][0]
    held = data.root / part["image"]
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        type(
            "Held", (HeldImage,), {"image": held.read_bytes(), "asked": threading.Event(), "release": threading.Event()}
        ),
    )
    handler = server.RequestHandlerClass
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        part["image"] = f"http://127.0.0.1:{server.server_port}/{held.name}"
        lines[9] = json.dumps(record)
        data.jsonl.write_text("\n".join(lines) + "\n")
        out = tmp_path / "out"
        command = [sys.executable, "-m", "shardkit.cli", "build", str(data.jsonl), "--out", str(out),
                   "--samples-per-shard", "2", "--workers", "2", "--no-progress", "--allow-remote",
                   "--remote-timeout", "600"]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert handler.asked.wait(300), "the build never asked for the held image"
        os.kill(worker_asking(process.pid, server.server_port), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
        line = one_line_error(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
        assert "worker process died" in line and "run the same command again" in line
        assert not (out / "manifest.json").exists()
        handler.release.set()
        result = shardkit(*command[3:])
        assert result.returncode == 0, result.stderr[-3000:]
        assert read_manifest(str(out)).num_samples == len(data.good_lines)
    finally:
        handler.release.set()
        server.shutdown()


def test_a_second_build_into_a_folder_being_built_is_refused(clinical, tmp_path):
    out = tmp_path / "out"
    fs, folder = open_fs(str(out))
    with lock(fs, folder):  # a build holds the folder
        line = one_line_error(shardkit("build", clinical.jsonl, "--out", out, "--no-progress"))
    assert "being written by another shardkit build" in line
    assert list(out.iterdir()) == []  # the refused build touched nothing
    assert build(BuildConfig.create(input=str(clinical.jsonl), out=str(out)), progress=False).num_samples


def test_an_unreachable_http_input_is_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/train.jsonl"
    assert main(["build", url, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardkit: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_an_object_store_without_credentials_is_one_line(clinical, tmp_path):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
            AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata credentials either
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
            AWS_CONFIG_FILE=str(tmp_path / "none"),
        )
        line = one_line_error(shardkit("build", clinical.jsonl, "--out", "s3://bucket/x", "--no-progress", env=env))
        assert "no usable credentials" in line and "AWS_ACCESS_KEY_ID" in line
    finally:
        server.stop()
