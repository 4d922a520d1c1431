"""Rendering parity: Qwen2-VL against ``apply_chat_template`` (real vocabulary, the model's
published template), Qwen3-VL against tinker-cookbook's ``qwen3_vl_instruct`` renderer."""

import numpy as np
import pytest
from PIL import Image

from shardkit.errors import RecordError
from shardkit.families import get_family
from shardkit.render import TrainOn
from shardkit.schema import Record
from tests.helpers import qwen3_image_processor

CONVERSATIONS = [
    # the seed's shape: images then text, one answer
    {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.jpg"},
                    {"type": "image", "image": "b.jpg"},
                    {"type": "text", "text": "Clinical case 01.\nSymptoms: itchy rash.\nWhat is the diagnosis?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "text",
                        "text": "Symptoms: itchy rash.\n\nDiagnosis: Scabies\n\nConfirmation/Key evidence: burrows.",
                    }
                ],
            },
        ]
    },
    # system prompt, multi-turn, image between texts, string contents
    {
        "messages": [
            {"role": "system", "content": "You are a careful dermatologist."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look: "},
                    {"type": "image", "image": "a.jpg"},
                    {"type": "text", "text": " what is it?"},
                ],
            },
            {"role": "assistant", "content": "A ring-shaped lesion."},
            {"role": "user", "content": [{"type": "image", "image": "c.jpg"}, {"type": "text", "text": "And now?"}]},
            {"role": "assistant", "content": "It has grown: tinea corporis."},
        ]
    },
    # whitespace at the edges of contents, where header and content tokens can merge
    {
        "messages": [
            {"role": "user", "content": "\n\n  leading blank lines"},
            {"role": "assistant", "content": "\n\nAnswer after blank lines.  \n"},
        ]
    },
    # unicode, emoji, CJK, several text parts in the answer
    {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.jpg"},
                    {"type": "text", "text": "Qu'est-ce que c'est ? 这是什么？ 🩺"},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Une éruption "}, {"type": "text", "text": "cutanée — 皮疹 🙂"}],
            },
        ]
    },
]

IMAGE_TOKENS = {"a.jpg": 12, "b.jpg": 30, "c.jpg": 4}


def image_tokens(record: Record) -> list[int]:
    return [IMAGE_TOKENS[p.image] for p in record.images()]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_qwen2_vl_tokens_equal_apply_chat_template(tokenizer, qwen2_vl_template, family, index):
    data = CONVERSATIONS[index]
    record = Record.model_validate(data)
    renderer = get_family(family).renderer(tokenizer)
    expanded = renderer.render(record, TrainOn.LAST_ASSISTANT).expand(image_tokens(record))
    reference = tokenizer.apply_chat_template(
        data["messages"], chat_template=qwen2_vl_template, tokenize=True, return_dict=False
    )
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = iter(image_tokens(record))
    expected = [t for token in reference for t in ([pad] * next(counts) if token == pad else [token])]
    assert expanded.input_ids.tolist() == expected
    assert expanded.input_ids.dtype == np.int32 and expanded.weights.dtype == np.float32
    for start, n in expanded.image_spans:
        assert (expanded.input_ids[start : start + n] == pad).all()
        assert expanded.input_ids[start - 1] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert expanded.input_ids[start + n] == tokenizer.convert_tokens_to_ids("<|vision_end|>")


def weighted_text(tokenizer, expanded) -> str:
    return tokenizer.decode(expanded.input_ids[expanded.weights > 0].tolist())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_hf"])
def test_weights_follow_train_on(tokenizer, family):
    record = Record.model_validate(CONVERSATIONS[1])
    renderer = get_family(family).renderer(tokenizer)

    def render(train_on):
        return renderer.render(record, train_on).expand(image_tokens(record))

    assert weighted_text(tokenizer, render(TrainOn.LAST_ASSISTANT)) == "It has grown: tinea corporis.<|im_end|>"
    assert (
        weighted_text(tokenizer, render(TrainOn.ALL_ASSISTANT))
        == "A ring-shaped lesion.<|im_end|>It has grown: tinea corporis.<|im_end|>"
    )
    everything = render(TrainOn.ALL)
    text = weighted_text(tokenizer, everything)
    assert "You are a careful dermatologist." in text and "Look: " in text and "And now?" in text
    assert "<|im_start|>" not in text and "assistant\n" not in text
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for start, n in everything.image_spans:  # image tokens never carry weight
        assert not everything.weights[start - 1 : start + n + 1].any()
    assert (everything.input_ids[everything.weights > 0] != pad).all()


def test_default_system_prompt_is_never_trained(tokenizer):
    record = Record.model_validate(CONVERSATIONS[0])
    expanded = get_family("qwen2_vl").renderer(tokenizer).render(record, TrainOn.ALL).expand(image_tokens(record))
    assert tokenizer.decode(expanded.input_ids[:10].tolist()).startswith(
        "<|im_start|>system\nYou are a helpful assistant."
    )
    assert "helpful" not in weighted_text(tokenizer, expanded)


def test_text_with_control_tokens_is_rejected(tokenizer):
    record = Record.model_validate(
        {
            "messages": [
                {"role": "user", "content": "sneaky <|image_pad|> token"},
                {"role": "assistant", "content": "ok"},
            ]
        }
    )
    with pytest.raises(RecordError) as info:
        get_family("qwen2_vl").renderer(tokenizer).render(record, TrainOn.LAST_ASSISTANT)
    assert info.value.code == "reserved_token" and "<|image_pad|>" in info.value.reason


def test_a_tokenizer_without_vision_tokens_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from shardkit.errors import ConfigError

    with pytest.raises(ConfigError, match="not a Qwen2-VL family tokenizer"):
        get_family("qwen2_vl").renderer(Tokenizer(WordLevel({"a": 0}, unk_token="a")))


# --- Qwen3-VL against tinker-cookbook ------------------------------------------------------

SIZES = {"a.jpg": (256, 320), "b.jpg": (512, 288), "c.jpg": (256, 256)}  # (height, width), on the 32-pixel grid


def cookbook_tokens(model_input, pad: int) -> tuple[list[int], list[int]]:
    """A cookbook ``ModelInput``'s tokens, each image chunk as ``pad`` repeated its token count, and those counts."""
    import tinker

    tokens, counts = [], []
    for chunk in model_input.chunks:
        if isinstance(chunk, tinker.types.ImageChunk):
            tokens += [pad] * chunk.expected_tokens
            counts.append(chunk.expected_tokens)
        else:
            tokens += list(chunk.tokens)
    return tokens, counts


def tinker_messages(data: dict) -> list[dict]:
    out = []
    for message in data["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": Image.new("RGB", SIZES[p["image"]][::-1], (90, 40, 20))}
                if p["type"] == "image"
                else p
                for p in content
            ]
        out.append({"role": message["role"], "content": content})
    return out


@pytest.mark.parametrize(
    "train_on, tinker_name",
    [(TrainOn.LAST_ASSISTANT, "LAST_ASSISTANT_MESSAGE"), (TrainOn.ALL_ASSISTANT, "ALL_ASSISTANT_MESSAGES")],
)
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_qwen3_vl_equals_tinker_cookbook(tokenizer, index, train_on, tinker_name):
    pytest.importorskip("tinker_cookbook", reason="not in bin/test's newest-transformers environment (it pins <=5.5.4)")
    from tinker_cookbook.renderers import TrainOnWhat, get_renderer

    data = CONVERSATIONS[index]
    record = Record.model_validate(data)
    family = get_family("qwen3_vl")
    counts = [(SIZES[p.image][0] // family.factor) * (SIZES[p.image][1] // family.factor) for p in record.images()]
    ours = family.renderer(tokenizer).render(record, train_on).expand(counts)

    reference = get_renderer(family.tinker_renderer, tokenizer, qwen3_image_processor())
    model_input, weights = reference.build_supervised_example(
        tinker_messages(data), train_on_what=TrainOnWhat[tinker_name]
    )
    tokens, expected_counts = cookbook_tokens(model_input, tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert expected_counts == counts
    assert ours.input_ids.tolist() == tokens
    assert ours.weights.tolist() == weights.tolist()


# --- per-message loss (ms-swift's "loss", tinker-cookbook's per-message trainable) ------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_message_loss_flag_overrides_train_on_for_that_message(tokenizer, family):
    data = CONVERSATIONS[1]
    messages = [dict(m) for m in data["messages"]]
    messages[2]["loss"] = True  # the first answer, not trained by last_assistant alone
    messages[4]["loss"] = False  # the last answer
    messages[3]["loss"] = True  # a user message
    record = Record.model_validate({"messages": messages})
    renderer = get_family(family).renderer(tokenizer)
    expanded = renderer.render(record, TrainOn.LAST_ASSISTANT).expand(image_tokens(record))
    assert weighted_text(tokenizer, expanded) == "A ring-shaped lesion.<|im_end|>And now?<|im_end|>"
    # the flags change weights only, never tokens
    plain = renderer.render(Record.model_validate(data), TrainOn.LAST_ASSISTANT).expand(image_tokens(record))
    assert expanded.input_ids.tolist() == plain.input_ids.tolist()
    everything = renderer.render(record, TrainOn.ALL).expand(image_tokens(record))
    assert "tinea corporis" not in weighted_text(tokenizer, everything)
    assert "You are a careful dermatologist." in weighted_text(tokenizer, everything)
