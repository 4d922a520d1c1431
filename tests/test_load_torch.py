"""Model-ready torch batches: equal to the processor and tokenizer, accepted by a tiny Qwen2-VL."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shardkit.load import ShardStream
from shardkit.load.torch import Qwen2VLCollator, TorchLoader, expand_patches, image_patches
from shardkit.shards import read_manifest
from tests.conftest import tiny_qwen2_vl_config


def stored_images(samples):
    return [Image.open(io.BytesIO(j)) for s in samples for j in s.images]


@pytest.fixture(scope="module")
def processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor()


def test_batch_equals_the_processor_and_the_chat_template(
    builds, small_dataset, tokenizer, qwen2_vl_template, processor
):
    stream = ShardStream(builds["tar"], batch_size=5, seed=0)
    samples = next(iter(stream))
    batch = Qwen2VLCollator.for_build(stream.source.manifest)(samples)
    reference = processor(images=stored_images(samples), return_tensors="np")
    assert torch.allclose(batch["pixel_values"], torch.from_numpy(reference["pixel_values"]), atol=1e-5)
    assert batch["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()

    records = {i + 1: line for i, line in enumerate(small_dataset.jsonl.read_text().splitlines())}
    grids = iter(reference["image_grid_thw"].tolist())
    pad = 151655
    for row, sample in enumerate(samples):
        messages = json.loads(records[sample.info["line"]])["messages"]
        ids = tokenizer.apply_chat_template(messages, chat_template=qwen2_vl_template, tokenize=True, return_dict=False)
        expected = []
        for token in ids:
            expected += [pad] * (int(np.prod(next(grids))) // 4) if token == pad else [token]
        n = len(expected)
        assert batch["input_ids"][row, :n].tolist() == expected
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][row, n:] == 151643).all()
        weights = torch.from_numpy(sample.weights)
        assert batch["labels"][row, :n].tolist() == torch.where(weights > 0, torch.tensor(expected), -100).tolist()
        assert (batch["labels"][row, n:] == -100).all()
        assert batch["mm_token_type_ids"][row].tolist() == [int(t == pad) for t in expected] + [0] * (
            batch["input_ids"].shape[1] - n
        )
        trained = tokenizer.decode(batch["input_ids"][row][batch["labels"][row] != -100].tolist())
        assert trained == json.loads(records[sample.info["line"]])["messages"][-1]["content"][0]["text"] + "<|im_end|>"


def test_uint8_patches_expand_on_the_device_to_the_same_values(builds):
    stream = ShardStream(builds["parquet"], batch_size=4, seed=1)
    samples = next(iter(stream))
    manifest = stream.source.manifest
    full = Qwen2VLCollator.for_build(manifest)(samples)
    small = Qwen2VLCollator.for_build(manifest, pixels="uint8")(samples)
    assert "pixel_values" not in small and small["pixel_patches"].dtype == torch.uint8
    assert full["pixel_values"].element_size() * full["pixel_values"].numel() == 8 * small["pixel_patches"].numel()
    moved = Qwen2VLCollator.for_build(manifest, pixels="uint8").to_device(small, "cpu")
    assert torch.equal(moved["pixel_values"], full["pixel_values"])
    assert torch.equal(moved["input_ids"], full["input_ids"])


def test_patch_order_matches_the_processor_on_an_odd_grid(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (28 * 3, 28 * 5, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless, to compare exactly
    patches = torch.from_numpy(image_patches(buffer.getvalue(), 14, 2))
    ours = expand_patches(patches, processor.image_mean, processor.image_std)
    theirs = torch.from_numpy(processor(images=[image], return_tensors="np")["pixel_values"])
    assert ours.shape == theirs.shape == (6 * 10, 3 * 2 * 14 * 14)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_tiny_qwen2_vl_trains_on_a_batch(builds, family):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(tiny_qwen2_vl_config(family))
    stream = ShardStream(builds["tar"], batch_size=3, seed=0)
    batch = Qwen2VLCollator.for_build(stream.source.manifest)(next(iter(stream)))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # the images reached the loss


def batch_keys(loader):
    return [tuple(k) for k in loader]


def keyed(samples):
    return [s.key for s in samples]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_workers_resumes_exactly(builds, workers):
    def loader():
        return TorchLoader(ShardStream(builds["tar"], batch_size=3, seed=4), collate=keyed, num_workers=workers)

    uninterrupted = batch_keys(loader())
    first = loader()
    taken = []
    for batch in first:
        taken.append(tuple(batch))
        if len(taken) == 5:
            break
    state = first.state_dict()
    second = loader()
    second.load_state_dict(json.loads(json.dumps(state)))
    assert taken + batch_keys(second) == uninterrupted
    assert second.epoch == 1


def test_workers_and_main_process_give_the_same_samples(builds):
    main = {k for b in TorchLoader(ShardStream(builds["tar"], batch_size=2), collate=keyed) for k in b}
    workers = {
        k for b in TorchLoader(ShardStream(builds["tar"], batch_size=2), collate=keyed, num_workers=2) for k in b
    }
    assert main == workers and len(main) == read_manifest(builds["tar"]).num_samples


def test_default_collate_gives_model_batches_through_workers(builds):
    loader = TorchLoader(ShardStream(builds["tar"], max_tokens=4096, seed=0), num_workers=2)
    batch = next(iter(loader))
    assert {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"} <= set(batch)
    assert batch["input_ids"].numel() <= 4096
