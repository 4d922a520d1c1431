"""Qwen3-VL on the local torch path: tokens against the published chat template and tinker-cookbook,
batches against ``Qwen3VLProcessor``, M-RoPE positions against the model, packed losses, and training
(dense and MoE, full fine-tune and LoRA, resume, torchrun) with tiny random models (the parity tests with the real
vocabulary, the training tests with a small tokenizer)."""

import json
import subprocess
from unittest import mock

import pytest
import torch

from shardkit.families import get_family
from shardkit.load import ShardStream
from shardkit.load.batch import Collator, mrope_positions
from shardkit.render import TrainOn
from shardkit.schema import Record
from shardkit.testing import TINY_VOCAB_SIZE, tiny_qwen3_vl_config
from shardkit.train.local import TrainConfig, train
from tests.helpers import FIXTURES, IMAGE_BACKENDS, qwen3_image_processor, torchrun
from tests.test_load_torch import per_sample_losses, spans
from tests.test_render import CONVERSATIONS, image_tokens

PAD = 151655


@pytest.fixture(scope="module")
def template() -> str:
    return (FIXTURES / "qwen3_vl_chat_template.jinja").read_text()


def template_ids(tokenizer, template, messages, counts):
    """``apply_chat_template``'s tokens, each image pad expanded to its count."""
    ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
    pad, counts = tokenizer.convert_tokens_to_ids("<|image_pad|>"), iter(counts)
    return [t for token in ids for t in ([pad] * next(counts) if token == pad else [token])]


# --- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_qwen3_vl_hf_tokens_equal_the_published_template(tokenizer, template, index):
    data = CONVERSATIONS[index]
    record = Record.model_validate(data)
    expanded = get_family("qwen3_vl_hf").renderer(tokenizer).render(record, TrainOn.ALL_ASSISTANT)
    expanded = expanded.expand(image_tokens(record))
    assert expanded.input_ids.tolist() == template_ids(tokenizer, template, data["messages"], image_tokens(record))
    assert expanded.weights[-1] == 0 and tokenizer.decode(expanded.input_ids[-2:].tolist()) == "<|im_end|>\n"


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_tinker_format_differs_from_the_template_only_as_documented(tokenizer, template, index):
    data = CONVERSATIONS[index]
    record = Record.model_validate(data)
    counts = image_tokens(record)
    tinker = get_family("qwen3_vl").renderer(tokenizer).render(record, TrainOn.ALL_ASSISTANT).expand(counts)
    hf = get_family("qwen3_vl_hf").renderer(tokenizer).render(record, TrainOn.ALL_ASSISTANT).expand(counts)
    # the same text, but the template's trailing newline
    assert tokenizer.decode(tinker.input_ids.tolist()) + "\n" == tokenizer.decode(hf.input_ids.tolist())
    edges = any(isinstance(m["content"], str) and m["content"][:1].isspace() for m in data["messages"])
    if edges:  # a content starting with whitespace meets the header's newline in one encode only,
        # and the merged token, ending in the content, takes the content's weight
        assert tinker.input_ids.tolist() + [198] != hf.input_ids.tolist()
        assert weighted(tokenizer, hf) == "\n" + weighted(tokenizer, tinker)
    else:
        assert tinker.input_ids.tolist() + [198] == hf.input_ids.tolist()
        assert weighted(tokenizer, tinker) == weighted(tokenizer, hf)


def weighted(tokenizer, expanded) -> str:
    return tokenizer.decode(expanded.input_ids[expanded.weights > 0].tolist())


# --- batches --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_build(small_dataset, make_build) -> str:
    return make_build(small_dataset.jsonl, model="qwen3_vl_hf", samples_per_shard=8)


def qwen3_processor(tokenizer, backend):
    """``Qwen3VLProcessor`` from the published settings, with the image processor of ``backend`` (named, see
    ``image_processor_class``). Its video processor (unused here) needs torchvision: where torchvision is absent a
    bare ``BaseVideoProcessor`` stands in, and the class check of that one argument is skipped."""
    from transformers import Qwen3VLProcessor

    images = qwen3_image_processor(backend)
    if backend == "torchvision":
        from transformers import Qwen3VLVideoProcessor

        return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor())
    from transformers.video_processing_utils import BaseVideoProcessor

    with mock.patch.object(Qwen3VLProcessor, "check_argument_for_proper_class", lambda self, name, arg: type(arg)):
        return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=BaseVideoProcessor())


@pytest.mark.parametrize("backend", IMAGE_BACKENDS)
def test_batch_equals_qwen3vl_processor_on_the_template(hf_build, small_dataset, tokenizer, template, backend):
    assert_batch_equals_the_processor(hf_build, small_dataset, tokenizer, template, backend)


def assert_batch_equals_the_processor(hf_build, small_dataset, tokenizer, template, backend):
    """A batch of 4 samples of ``hf_build`` (a build of ``small_dataset`` in the published template's format) equals
    ``Qwen3VLProcessor``'s output on the template's text and the stored images."""
    import io

    from PIL import Image

    stream = ShardStream(hf_build, batch_size=4, seed=0)
    samples = next(iter(stream))
    batch = Collator.for_build(stream.source.manifest)(samples)
    processor = qwen3_processor(tokenizer, backend)
    records = small_dataset.jsonl.read_text().splitlines()
    pixels, grids = [], []
    for row, sample in enumerate(samples):
        messages = json.loads(records[sample.info["line"] - 1])["messages"]
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        images = [Image.open(io.BytesIO(jpeg)) for jpeg in sample.images]
        expected = processor(text=[text], images=images, return_tensors="pt")
        n = expected["input_ids"].shape[1]
        assert batch["input_ids"][row, :n].tolist() == expected["input_ids"][0].tolist()
        assert batch["mm_token_type_ids"][row, :n].tolist() == expected["mm_token_type_ids"][0].tolist()
        assert batch["attention_mask"][row].sum() == n
        pixels.append(expected["pixel_values"])
        grids.append(expected["image_grid_thw"])
    assert torch.equal(batch["image_grid_thw"], torch.cat(grids))
    assert torch.allclose(batch["pixel_values"], torch.cat(pixels), atol=1e-5)
    assert batch["pixel_values"].shape[1] == 3 * 2 * 16 * 16
    uint8 = Collator.for_build(stream.source.manifest, pixels="uint8")
    assert torch.equal(uint8.to_device(uint8(samples), "cpu")["pixel_values"], batch["pixel_values"])


def random_qwen3_vl(moe=False, attn="sdpa", tokenizer=None):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)  # sharp enough that attention across samples shows clearly in the losses
    cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    model = cls(tiny_qwen3_vl_config(moe, initializer_range=0.2, tokenizer=tokenizer))
    model.set_attn_implementation(attn)
    return model


def test_mrope_positions_equal_the_models_rope_index(hf_build):
    model = random_qwen3_vl()
    stream = ShardStream(hf_build, batch_size=1, shuffle=False)
    collate = Collator.for_build(stream.source.manifest)
    for (sample,) in stream:
        alone = collate([sample])
        ids, types, grids = alone["input_ids"], alone["mm_token_type_ids"], alone["image_grid_thw"]
        expected, _ = model.model.get_rope_index(ids, types, grids)
        ours = mrope_positions(len(sample.input_ids), sample.info["images"], 2)
        assert torch.equal(torch.from_numpy(ours), expected[:, 0]), sample.key


@pytest.mark.parametrize("moe, attn", [(False, "sdpa"), (False, "eager"), (True, "sdpa")])
@pytest.mark.slow
def test_packed_losses_equal_each_sample_alone(hf_build, moe, attn):
    model = random_qwen3_vl(moe, attn)
    stream = ShardStream(hf_build, pack_tokens=1200, sequences_per_batch=2, seed=0)
    sequences, collate = next(iter(stream)), Collator.for_build(stream.source.manifest)
    batch = collate(sequences)
    assert len(spans(sequences)) > 2
    with torch.no_grad():
        packed = per_sample_losses(model(**batch).logits, batch["labels"], sequences)
        alone = [float(model(**collate([s])).loss) for _, _, s in spans(sequences)]
        # with a cache transformers drops the packed-sequence mask: samples then see their predecessors
        leaky = per_sample_losses(model(**{**batch, "use_cache": True}).logits, batch["labels"], sequences)
    firsts = [start == 0 for _, start, _ in spans(sequences)]
    assert packed == pytest.approx(alone, abs=1e-4)
    differ = [abs(a - b) > 1e-2 for a, b, first in zip(leaky, alone, firsts, strict=True) if not first]
    assert any(differ) and (moe or all(differ))  # the control: without the packed mask, the losses change


# --- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memorisable_qwen3(make_build, memorisable_data, tiny_tokenizer) -> str:
    """``memorisable``'s 8 short cases, one 64x64 image each (4 image tokens), in the template's format."""
    return make_build(memorisable_data.jsonl, model="qwen3_vl_hf", min_pixels=32 * 32, max_pixels=64 * 64,
                      samples_per_shard=4, tokenizer=tiny_tokenizer)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer) -> dict[str, str]:
    """Tiny random Qwen3-VL and Qwen3-VL-MoE checkpoints, saved as a model folder is."""
    return saved_checkpoints(tmp_path_factory, "tiny-qwen3", lambda moe: random_qwen3_vl(moe, tokenizer=tiny_tokenizer))


def saved_checkpoints(tmp_path_factory, prefix: str, make) -> dict[str, str]:
    """``{"dense": folder, "moe": folder}`` of the models ``make(moe)`` gives, saved as model folders are."""
    out = {}
    for name, moe in (("dense", False), ("moe", True)):
        folder = tmp_path_factory.mktemp(f"{prefix}-{name}")
        make(moe).save_pretrained(folder)
        out[name] = str(folder)
    return out


def run(tmp_path, data, model, name="run", **options):
    defaults = {"lr": 1e-2, "batch_size": 4, "num_workers": 0, "warmup_ratio": 0.1, "seed": 0, "save_every": 100}
    config = TrainConfig.create(data=data, model=model, output=str(tmp_path / name), **{**defaults, **options})
    return config, train(config)


def falls(history) -> bool:
    losses = [h["loss"] for h in history]
    return sum(losses[-3:]) / 3 < 0.5 * losses[0]


@pytest.mark.slow
def test_full_fine_tune_of_qwen3_vl_moe_learns(tmp_path, memorisable_qwen3, checkpoints):
    from transformers import Qwen3VLMoeForConditionalGeneration

    _, history = run(tmp_path, memorisable_qwen3, checkpoints["moe"], max_steps=16)
    assert falls(history), [h["loss"] for h in history]
    final = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    assert final.config.text_config.vocab_size == TINY_VOCAB_SIZE and final.config.text_config.num_experts == 4


@pytest.mark.slow
def test_lora_on_qwen3_vl_learns(tmp_path, memorisable_qwen3, checkpoints):
    _, history = run(tmp_path, memorisable_qwen3, checkpoints["dense"], max_steps=20, lr=2e-2, lora_rank=16)
    assert falls(history), [h["loss"] for h in history]
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == checkpoints["dense"]


def assert_resumes_with_the_same_losses(tmp_path, data, model):
    """A run of ``model`` on ``data`` stopped after step 3 of 4 and resumed gives the losses of one never stopped."""
    options = {"max_steps": 4, "save_every": 2, "batch_size": 2, "grad_accum": 2}
    _, uninterrupted = run(tmp_path, data, model, name="whole", **options)

    def crash(step, record):
        if step == 3:
            raise KeyboardInterrupt

    config = TrainConfig.create(data=data, model=model, output=str(tmp_path / "broken"), lr=1e-2, num_workers=0,
                                warmup_ratio=0.1, **options)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=crash)
    resumed = train(config.model_copy(update={"resume": True}))
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in uninterrupted[2:]], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_qwen3_vl_resumes_with_the_same_losses(tmp_path, memorisable_qwen3, checkpoints):
    assert_resumes_with_the_same_losses(tmp_path, memorisable_qwen3, checkpoints["dense"])


@pytest.mark.slow
def test_qwen3_vl_moe_under_torchrun_resumes(tmp_path, memorisable_qwen3, checkpoints):
    assert_packed_torchrun_resumes(tmp_path, memorisable_qwen3, checkpoints["moe"])


def assert_packed_torchrun_resumes(tmp_path, data, model):
    """Two CPU processes under torchrun train ``model`` on ``data`` packed for 2 steps, then resume to step 3."""
    output = tmp_path / "ddp"
    args = ["-m", "shardkit.cli", "-q", "train", "--data", data, "--model", model,
            "--output", str(output), "--num-workers", "0", "--lr", "1e-3", "--pack",
            "--batch-tokens", "256", "--max-steps"]  # fmt: skip
    first = subprocess.run([*torchrun(2), *args, "2"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([*torchrun(2), *args, "3", "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["samples"] >= 2 for r in rows)
    assert again.stdout.count("trained to step 3") == 1


@pytest.mark.slow
def test_accumulated_and_packed_steps_give_the_loss_of_one_batch(tmp_path, memorisable_qwen3, checkpoints):
    assert_accumulated_and_packed_steps_give_the_loss_of_one_batch(tmp_path, memorisable_qwen3, checkpoints["dense"])


def assert_accumulated_and_packed_steps_give_the_loss_of_one_batch(tmp_path, data, model):
    """The loss of one step over ``data``'s 8 samples is the mean over every target token of the step, whatever the
    micro-batches (Qwen3-VL's own loss would not be): one batch, two accumulated, 8 packed micro-batches of 512
    tokens. Returns the losses of the one batch and of the packed step."""
    _, whole = run(tmp_path, data, model, name="whole", max_steps=1, batch_size=8)
    _, accumulated = run(tmp_path, data, model, name="acc", max_steps=1, grad_accum=2)
    _, packed = run(tmp_path, data, model, name="packed", max_steps=1, batch_size=None, batch_tokens=512, pack=True,
                    grad_accum=8)  # fmt: skip
    assert accumulated[0]["samples"] == packed[0]["samples"] == 8
    assert accumulated[0]["loss"] == pytest.approx(whole[0]["loss"], rel=1e-5)
    assert packed[0]["loss"] == pytest.approx(whole[0]["loss"], rel=1e-5)
    return whole[0]["loss"], packed[0]["loss"]


@pytest.mark.slow
def test_freezing_the_qwen3_vl_vision_tower_leaves_it_and_its_deepstack_mergers_unchanged(
    tmp_path, memorisable_qwen3, checkpoints
):
    from transformers import Qwen3VLForConditionalGeneration

    run(tmp_path, memorisable_qwen3, checkpoints["dense"], max_steps=2, freeze_vision_tower=True)
    before = Qwen3VLForConditionalGeneration.from_pretrained(checkpoints["dense"]).state_dict()
    after = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before[n])]
    assert any("deepstack" in n for n in before), "the tiny tower has deepstack mergers"
    assert changed and not any("visual" in n for n in changed), changed
