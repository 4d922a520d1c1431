"""Helpers the tests import: real Pillow images, PyAV clips and JSONL files written for a test, the processors
compared with, ports and torchrun for the servers and process groups tests start. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardkit.families import get_family
from shardkit.synthetic import photo_like
from shardkit.video import VideoGrid

FIXTURES = Path(__file__).parent / "fixtures"
S3_SECRET = "s3cr3t-never-printed-7f3a"


def metrics(output: Path) -> list[dict]:
    """The lines of a training run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


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


def pattern(i: int, height: int, width: int) -> np.ndarray:
    """Frame ``i`` of a test clip: a colour ramp that moves with ``i``, so frames differ everywhere (and lossless
    clips keep it)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7 + i * 23) % 256, (y * 5 + i * 11) % 256, (x + y + i * 40) % 256], -1).astype(np.uint8)


def write_clip(path, frames, rate, height, width, codec="mpeg4", pix_fmt="yuv420p", pts_ms=None):
    """A clip of ``frames`` :func:`pattern` frames written with PyAV; ``pts_ms`` gives a variable frame rate (times
    in milliseconds)."""
    import fractions

    import av

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = fractions.Fraction(1, 1000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern(i, height, width), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def write_audio(path) -> Path:
    """A WAV file (a tenth of a second of silence) written with PyAV: a container with no video stream."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return Path(path)


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


def video_grid(family: str, **options: Any) -> VideoGrid:
    """``family``'s video rule (:attr:`Family.video_grid`), with :meth:`VideoGrid.with_options` overrides."""
    return get_family(family).video_grid.with_options(**options)


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
