"""Tinker Datums from qwen3_vl shards equal tinker-cookbook's ``conversation_to_datum``.

The Tinker service itself cannot be reached from here; the Datums are compared
with the cookbook's, built offline with the real vocabulary and the real
Qwen3-VL preprocessor settings.
"""

import hashlib
import io
import json

import pytest
import tinker
from PIL import Image

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.errors import ConfigError
from shardkit.load import ShardStream
from shardkit.load.tinker import DatumBatches, sample_to_datum
from tests.helpers import conversation, qwen3_image_processor, write_image, write_jsonl


def cookbook_datum(record, images, tokenizer, reduction, renderer_name="qwen3_vl_instruct"):
    """The cookbook's Datum of ``record`` by its renderer ``renderer_name``, every assistant turn trained (shardkit's
    default --train-on)."""
    from tinker_cookbook.renderers import TrainOnWhat, get_renderer
    from tinker_cookbook.supervised.data import conversation_to_datum

    processor = qwen3_image_processor()
    renderer = get_renderer(renderer_name, tokenizer, processor)
    pictures = iter(images)
    messages = []
    for m in record["messages"]:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": next(pictures)} if p["type"] == "image" else p for p in content]
        messages.append({"role": m["role"], "content": content})
    return conversation_to_datum(
        messages, renderer, max_length=None, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES, reduction=reduction
    )


def flat_chunks(model_input):
    """Text runs merged (the cookbook splits text at message boundaries; the tokens are what counts) and images."""
    out = []
    for chunk in model_input.chunks:
        if isinstance(chunk, tinker.types.ImageChunk):
            assert chunk.format == "jpeg"
            out.append(("image", chunk.expected_tokens))
        elif out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + list(chunk.tokens))
        else:
            out.append(("text", list(chunk.tokens)))
    return out


def assert_same_datum(ours, theirs):
    assert flat_chunks(ours.model_input) == flat_chunks(theirs.model_input)
    assert ours.model_input.length == theirs.model_input.length
    assert ours.loss_fn_inputs["target_tokens"].data == theirs.loss_fn_inputs["target_tokens"].data
    assert ours.loss_fn_inputs["weights"].data == pytest.approx(theirs.loss_fn_inputs["weights"].data, abs=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_datums_equal_tinker_cookbook(qwen3_build, small_dataset, tokenizer, reduction):
    assert_datums_equal_the_cookbooks(qwen3_build, small_dataset, tokenizer, reduction, "qwen3_vl_instruct")


def assert_datums_equal_the_cookbooks(build, small_dataset, tokenizer, reduction, renderer_name):
    """Every sample of ``build`` (of ``small_dataset``) as a Datum equals the cookbook's, by ``renderer_name``."""
    records = {i + 1: json.loads(line) for i, line in enumerate(small_dataset.jsonl.read_text().splitlines()) if line}
    checked = 0
    for batch in ShardStream(str(build), batch_size=8, shuffle=False):
        for sample in batch:
            images = [Image.open(io.BytesIO(j)) for j in sample.images]
            ours = sample_to_datum(sample, reduction=reduction)
            theirs = cookbook_datum(records[sample.info["line"]], images, tokenizer, reduction, renderer_name)
            assert_same_datum(ours, theirs)
            assert [c.data for c in ours.model_input.chunks if isinstance(c, tinker.types.ImageChunk)] == sample.images
            checked += 1
    assert checked == len(small_dataset.good_lines)


def test_trailing_image_and_multi_turn(tmp_path, tokenizer):
    root = tmp_path / "d"
    write_image(root / "images" / "a.jpg", 300, 260)
    write_image(root / "images" / "b.jpg", 256, 256)
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Look"}, {"type": "image", "image": "images/a.jpg"}],
                },
                {"role": "assistant", "content": "A rash."},
                {"role": "user", "content": [{"type": "image", "image": "images/b.jpg"}]},
                {"role": "assistant", "content": "Also a rash."},
            ]
        },
        conversation("images/b.jpg", question="One more?", answer="No."),
    ]
    data = write_jsonl(root / "in.jsonl", records)
    build(BuildConfig.create(input=str(data), out=str(tmp_path / "out"), model="qwen3_vl"), progress=False)
    samples = [s for b in ShardStream(str(tmp_path / "out"), batch_size=2, shuffle=False) for s in b]
    for sample, record in zip(samples, records, strict=True):
        images = [Image.open(io.BytesIO(j)) for j in sample.images]
        assert_same_datum(sample_to_datum(sample), cookbook_datum(record, images, tokenizer, "mean"))


def datum_content(datum):
    """Everything a Datum holds: text tokens, image bytes (hashed) with their token counts, targets and weights."""
    chunks = [
        ("image", hashlib.sha256(c.data).hexdigest(), c.expected_tokens)
        if isinstance(c, tinker.types.ImageChunk)
        else ("text", list(c.tokens))
        for c in datum.model_input.chunks
    ]
    inputs = datum.loss_fn_inputs
    return chunks, inputs["target_tokens"].data, inputs["weights"].data


def test_datum_batches_resume_mid_epoch_with_the_same_datums(qwen3_build):
    def content(batches):
        return [[datum_content(d) for d in b] for b in batches]

    whole = content(DatumBatches(ShardStream(str(qwen3_build), batch_size=4, seed=2)))
    first = DatumBatches(ShardStream(str(qwen3_build), batch_size=4, seed=2))
    it = iter(first)
    taken = content([next(it), next(it)])
    again = DatumBatches(ShardStream(str(qwen3_build), batch_size=4, seed=2))
    again.load_state_dict(first.state_dict())
    rest = content(again)
    assert len(whole) > 3 and any(chunk[0] == "image" for b in whole for d in b for chunk in d[0])
    assert taken + rest == whole


def test_datum_batches_refuse_a_packed_stream(qwen3_build):
    with pytest.raises(ConfigError, match="one Datum per sample"):
        DatumBatches(ShardStream(str(qwen3_build), pack_tokens=4096))
