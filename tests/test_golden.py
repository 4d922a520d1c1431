"""Golden digests: a tiny fixed input built with fixed options gives the same bytes as when the digests were made.

``tests/fixtures/golden/`` holds five records (``records.jsonl``) and their images: fixed files, made once and
committed, so that only the build pipeline decides the output bytes (JPEG, PNG with transparency, grey, an EXIF
rotation, two images in one sample, a system message, two turns, non-ASCII text). Each build's shard files and
``index.parquet`` are compared by sha256, and its manifest without ``created_by`` (the version string) by the sha256
of its canonical JSON. The real Qwen vocabulary tokenizes, through transformers' tokenizer, so the digests must be
the same under every tested transformers version.

A changed digest means the output bytes changed: a Pillow, libjpeg, numpy, webdataset, pyarrow or tokenizers
upgrade, or a change in shardkit's code. Decide deliberately, then regenerate ``digests.json`` with

    SHARDKIT_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py

and commit it with the change that explains it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from shardkit.build import build
from shardkit.config import BuildConfig
from tests.helpers import FIXTURES

GOLDEN = FIXTURES / "golden"
DIGESTS = GOLDEN / "digests.json"
REGENERATE = "SHARDKIT_REGENERATE_GOLDEN"
#: name -> the build's fixed options (everything else at its default, which is part of what is pinned)
BUILDS = {
    "tar-qwen2_vl": {"format": "tar", "model": "qwen2_vl", "samples_per_shard": 2},
    "parquet-qwen3_vl": {"format": "parquet", "model": "qwen3_vl", "samples_per_shard": 3},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests_of(folder: Path) -> dict:
    """The sha256 of each shard and of ``index.parquet``, and of the manifest's canonical JSON less ``created_by``."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("created_by")
    files = [shard["path"] for shard in manifest["shards"]] + [manifest["index"]["path"]]
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return {
        "files": {name: sha256(folder / name) for name in files},
        "manifest": hashlib.sha256(canonical).hexdigest(),
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict]:
    """Every build of ``BUILDS`` from a copy of the fixture folder (a build never writes next to its input)."""
    root = tmp_path_factory.mktemp("golden")
    data = root / "data"
    shutil.copytree(GOLDEN, data, ignore=shutil.ignore_patterns("digests.json"))
    out = {}
    for name, options in BUILDS.items():
        config = BuildConfig.create(input=str(data / "records.jsonl"), out=str(root / name), **options)
        manifest = build(config, progress=False)
        assert manifest.num_samples == 5 and manifest.num_rejected == 0
        out[name] = digests_of(root / name)
    return out


def test_a_fixed_build_gives_the_committed_digests(built):
    if os.environ.get(REGENERATE):
        DIGESTS.write_text(json.dumps(built, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"{REGENERATE} is set: rewrote {DIGESTS.relative_to(FIXTURES.parent.parent)}; review and commit it")
    expected, actual = flat(json.loads(DIGESTS.read_text())), flat(built)
    changed = sorted(key for key in expected.keys() | actual.keys() if expected.get(key) != actual.get(key))
    assert not changed, (
        "the golden build's output bytes changed: " + ", ".join(changed) + ". This follows a Pillow, libjpeg, numpy, "
        "webdataset, pyarrow or tokenizers upgrade, or a change in shardkit's code, and must be a deliberate "
        "decision (builds made before and after differ). If it is intended, regenerate the digests with "
        f"`{REGENERATE}=1 python -m pytest tests/test_golden.py` and commit tests/fixtures/golden/digests.json "
        "with the change."
    )


def flat(digests: dict) -> dict[str, str]:
    """``{"build: file": sha256, "build: manifest": sha256}``."""
    out = {}
    for name, entry in digests.items():
        out |= {f"{name}: {file}": digest for file, digest in entry["files"].items()}
        out[f"{name}: manifest"] = entry["manifest"]
    return out


def test_the_digests_notice_a_changed_byte(built, tmp_path):
    # the control: one option more (another JPEG quality) changes every shard, the index and the manifest
    shutil.copytree(GOLDEN, tmp_path / "data", ignore=shutil.ignore_patterns("digests.json"))
    options = {**BUILDS["tar-qwen2_vl"], "jpeg_quality": 89}
    config = BuildConfig.create(input=str(tmp_path / "data" / "records.jsonl"), out=str(tmp_path / "out"), **options)
    build(config, progress=False)
    other, golden = digests_of(tmp_path / "out"), built["tar-qwen2_vl"]
    assert other["files"].keys() == golden["files"].keys()
    assert all(other["files"][f] != golden["files"][f] for f in golden["files"] if f.endswith(".tar"))
    assert other["manifest"] != golden["manifest"]
