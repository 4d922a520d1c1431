"""Model-ready torch batches: equal to the processor and tokenizer, accepted by a tiny Qwen2-VL."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shardkit.load import ShardStream
from shardkit.load.batch import Collator, expand_patches, image_patches, mrope_positions
from shardkit.load.torch import TorchLoader
from shardkit.shards import read_manifest
from shardkit.testing import tiny_qwen2_vl_config
from tests.helpers import IMAGE_BACKENDS, image_processor_class


def stored_images(samples):
    return [Image.open(io.BytesIO(j)) for s in samples for j in s.images]


@pytest.fixture(scope="module", params=IMAGE_BACKENDS)
def processor(request):
    """transformers' Qwen2-VL image processor, each backend by name (tests/helpers.py: image_processor_class)."""
    return image_processor_class(request.param)()


def test_batch_equals_the_processor_and_the_chat_template(
    builds, small_dataset, tokenizer, qwen2_vl_template, processor
):
    stream = ShardStream(builds["tar"], batch_size=5, seed=0)
    samples = next(iter(stream))
    batch = Collator.for_build(stream.source.manifest)(samples)
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
    full = Collator.for_build(manifest)(samples)
    small = Collator.for_build(manifest, pixels="uint8")(samples)
    assert "pixel_values" not in small and small["pixel_patches"].dtype == torch.uint8
    assert full["pixel_values"].element_size() * full["pixel_values"].numel() == 8 * small["pixel_patches"].numel()
    moved = Collator.for_build(manifest, pixels="uint8").to_device(small, "cpu")
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
@pytest.mark.slow
def test_a_tiny_qwen2_vl_trains_on_a_batch(builds, family):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(tiny_qwen2_vl_config(family))
    stream = ShardStream(builds["tar"], batch_size=3, seed=0)
    batch = Collator.for_build(stream.source.manifest)(next(iter(stream)))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # the images reached the loss


def random_qwen2_vl(family, attn="sdpa"):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)  # sharp enough that attention across samples shows clearly in the losses
    model = cls(tiny_qwen2_vl_config(family, initializer_range=0.2))
    model.set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_equal_the_models_rope_index_on_every_sample(builds, family):
    model = random_qwen2_vl(family)
    stream = ShardStream(builds["tar"], batch_size=1, shuffle=False)
    collate = Collator.for_build(stream.source.manifest)
    for (sample,) in stream:
        alone = collate([sample])
        expected, _ = model.model.get_rope_index(
            alone["input_ids"], alone["mm_token_type_ids"], alone["image_grid_thw"]
        )
        ours = mrope_positions(len(sample.input_ids), sample.info["images"], 2)
        assert torch.equal(torch.from_numpy(ours), expected[:, 0]), sample.key


def packed_batch(builds, **options):
    """The first batch of two packed sequences, and the build's collator."""
    stream = ShardStream(builds["tar"], pack_tokens=600, sequences_per_batch=2, seed=0)
    return next(iter(stream)), Collator.for_build(stream.source.manifest, **options)


def spans(sequences):
    """(row, start, sample) of every sample of a packed batch."""
    out = []
    for row, sequence in enumerate(sequences):
        start = 0
        for sample in sequence:
            out.append((row, start, sample))
            start += len(sample.input_ids)
    return out


def test_packed_batch_holds_each_sample_as_alone_with_reset_positions(builds):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    sequences, collate = packed_batch(builds)
    batch = collate(sequences)
    samples = [s for sequence in sequences for s in sequence]
    assert len(sequences) == 2 and len(samples) > 4 and "attention_mask" not in batch and batch["use_cache"] is False
    rows, length = batch["input_ids"].shape
    assert length == max(sum(len(s.input_ids) for s in sequence) for sequence in sequences)
    assert batch["position_ids"].shape == (4, rows, length)
    for row, start, sample in spans(sequences):
        alone = collate([sample])
        n = len(sample.input_ids)
        assert torch.equal(batch["input_ids"][row, start : start + n], alone["input_ids"][0])
        assert batch["labels"][row, start] == -100  # the previous sample does not predict this one's start
        assert torch.equal(batch["labels"][row, start + 1 : start + n], alone["labels"][0, 1:])
        assert torch.equal(batch["position_ids"][0, row, start : start + n], torch.arange(n))
        positions = mrope_positions(n, sample.info["images"], 2)
        assert torch.equal(batch["position_ids"][1:, row, start : start + n], torch.from_numpy(positions))
    for row, sequence in enumerate(sequences):
        end = sum(len(s.input_ids) for s in sequence)
        assert (batch["input_ids"][row, end:] == collate.pad_token_id).all()
        assert (batch["labels"][row, end:] == -100).all()
    # images in token order: the features land on their own tokens
    alone = [collate([s]) for s in samples]
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([a["image_grid_thw"] for a in alone]))
    # flash-attention's sequence boundaries: what transformers derives from the position resets, the samples
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"][0])
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_q)
    starts = [row * length + start for row, start, _ in spans(sequences)]
    assert batch["cu_seq_lens_q"].tolist() == [*starts, rows * length]
    assert collate.count(batch) == (len(samples), sum(len(s.input_ids) for s in samples))
    _, small = packed_batch(builds, pixels="uint8")
    moved = small.to_device(small(sequences), "cpu")
    assert torch.equal(moved["pixel_values"], batch["pixel_values"]) and moved["max_length_q"] == batch["max_length_q"]


def per_sample_losses(logits, labels, sequences):
    losses = []
    for row, start, sample in spans(sequences):
        end = start + len(sample.input_ids)
        losses.append(
            float(torch.nn.functional.cross_entropy(logits[row, start : end - 1], labels[row, start + 1 : end]))
        )
    return losses


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.slow
def test_packed_losses_equal_each_sample_alone(builds, family, attn):
    model = random_qwen2_vl(family, attn)
    sequences, collate = packed_batch(builds)
    batch = collate(sequences)
    with torch.no_grad():
        packed = per_sample_losses(model(**batch).logits, batch["labels"], sequences)
        alone = [float(model(**collate([s])).loss) for _, _, s in spans(sequences)]
        # with a cache transformers drops the packed-sequence mask: samples then see their predecessors
        leaky = per_sample_losses(model(**{**batch, "use_cache": True}).logits, batch["labels"], sequences)
    assert packed == pytest.approx(alone, abs=1e-4)
    firsts = [start == 0 for _, start, _ in spans(sequences)]
    assert all(abs(a - b) > 1e-2 for a, b, first in zip(leaky, alone, firsts, strict=True) if not first)


def batch_keys(loader):
    return [tuple(k) for k in loader]


def keyed(samples):
    return [s.key for s in samples]


def keyed_packed(sequences):
    return [tuple(s.key for s in sequence) for sequence in sequences]


@pytest.mark.parametrize(
    "options, collate", [({"batch_size": 3}, keyed), ({"pack_tokens": 500, "sequences_per_batch": 2}, keyed_packed)]
)
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_workers_resumes_exactly(builds, workers, options, collate):
    def loader():
        return TorchLoader(ShardStream(builds["tar"], seed=4, **options), collate=collate, num_workers=workers)

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
    packed = next(iter(TorchLoader(ShardStream(builds["tar"], pack_tokens=1024, seed=0), num_workers=2)))
    assert {"input_ids", "position_ids", "cu_seq_lens_q", "labels", "pixel_values", "image_grid_thw"} <= set(packed)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].shape[1] <= 1024


def keyed_any(batch):
    """Sample keys of a plain batch, or of each sequence of a packed one."""
    return keyed_packed(batch) if isinstance(batch[0], list) else keyed(batch)


WORKER_CASES = {"plain": {"batch_size": 3}, "budget": {"max_tokens": 1500}, "packed": {"pack_tokens": 700}}


@pytest.mark.parametrize("options", WORKER_CASES.values(), ids=WORKER_CASES.keys())
def test_batches_do_not_depend_on_the_number_of_workers(builds, options):
    def loader(workers):
        stream = ShardStream(builds["tar"], seed=6, bucket_window=16, **options)
        stream.set_epoch(1)
        return TorchLoader(stream, collate=keyed_any, num_workers=workers)

    by_workers = {workers: batch_keys(loader(workers)) for workers in (0, 1, 2, 3)}
    for workers in (1, 2, 3):
        assert by_workers[workers] == by_workers[0], f"{workers} workers"

    # a run on 0 workers, stopped mid-epoch, resumed on 2: the same rest
    first = loader(0)
    taken = []
    for batch in first:
        taken.append(tuple(batch))
        if len(taken) == 4:
            break
    second = loader(2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert taken + batch_keys(second) == by_workers[0]


def batches_of(loader):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in loader]


def assert_same_batches(ours, reference):
    assert len(ours) == len(reference)
    for got, expected in zip(ours, reference, strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key


@pytest.mark.parametrize("options", [{"batch_size": 3}, {"pack_tokens": 700}], ids=["plain", "packed"])
def test_workers_pass_uint8_and_the_batches_are_the_float32_ones(builds, options, monkeypatch):
    """Through workers the pixels cross as uint8 patches and become ``pixel_values`` here: the same batches, to the
    bit, as one process making float32 itself."""

    def loader(workers, **kwargs):
        return TorchLoader(ShardStream(builds["tar"], seed=2, **options), num_workers=workers, **kwargs)

    reference = batches_of(loader(0))
    assert all(b["pixel_values"].dtype == torch.float32 and "pixel_patches" not in b for b in reference)
    made = []
    real = Collator.to_device
    monkeypatch.setattr(
        Collator, "to_device", lambda self, batch, *a, **k: made.append(set(batch)) or real(self, batch, *a, **k)
    )
    assert_same_batches(batches_of(loader(2)), reference)
    assert made and all("pixel_patches" in keys and "pixel_values" not in keys for keys in made)
    made.clear()
    assert_same_batches(batches_of(loader(0, device="cpu")), reference)  # a device: made there, from uint8
    assert len(made) == len(reference) and all("pixel_patches" in keys for keys in made)


def test_a_uint8_collator_without_a_device_keeps_its_patches(builds):
    stream = ShardStream(builds["tar"], batch_size=3, seed=2)
    collate = Collator.for_build(stream.source.manifest, pixels="uint8")
    for workers in (0, 2):
        batch = next(iter(TorchLoader(stream, collate=collate, num_workers=workers)))
        assert batch["pixel_patches"].dtype == torch.uint8 and "pixel_values" not in batch
    assert collate.pixels == "uint8"


def test_a_large_float32_batch_lies_in_huge_page_memory_with_the_values_of_the_devices_ops():
    """The CPU's chunked numpy normalisation gives, to the bit, what the torch ops run on a GPU give (here run on
    the CPU), in a fresh huge-page-aligned mapping when large, in one chunk or many."""
    from shardkit.load.batch import CHUNK_PATCHES, HUGE_PAGES_FROM

    patches = torch.randint(0, 256, (HUGE_PAGES_FROM // (4 * 2 * 3 * 14 * 14) + 100, 3, 14, 14), dtype=torch.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    out = expand_patches(patches, mean, std)
    assert out.data_ptr() % (2 << 20) == 0 and len(patches) > CHUNK_PATCHES
    n = len(patches)
    expected = torch.empty(n, 3, 2, 14, 14)
    first = expected[:, :, 0]
    first.copy_(patches)
    first.mul_(torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1))
    first.add_(torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1))
    expected[:, :, 1:].copy_(first.unsqueeze(2))
    assert torch.equal(out, expected.view(n, -1))
    assert torch.equal(expand_patches(patches[:10], mean, std), out[:10])
    assert torch.allclose(out.view(n, 3, 2, 196)[:, :, 0], (patches.float().view(n, 3, 196) / 255 - torch.tensor(
        mean).view(1, 3, 1)) / torch.tensor(std).view(1, 3, 1), atol=1e-5)  # fmt: skip


def test_a_batchs_images_and_pixels_are_made_on_torchs_threads_with_the_same_values(builds, monkeypatch):
    import threading

    from shardkit.load.batch import parallel_map

    stream = ShardStream(builds["tar"], batch_size=6, seed=3)
    samples = next(iter(stream))
    collate = Collator.for_build(stream.source.manifest)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # as in a DataLoader worker
    assert {name for _, name in parallel_map(lambda i: (i, threading.current_thread().name), range(8))} == {
        threading.current_thread().name
    }
    alone = collate(samples)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    done = parallel_map(lambda i: (i, threading.current_thread().name), range(40))
    assert [i for i, _ in done] == list(range(40)) and all(name.startswith("shardkit-collate") for _, name in done)
    assert not [t for t in threading.enumerate() if t.name.startswith("shardkit-collate")]  # none left behind
    threaded = collate(samples)
    assert torch.equal(threaded["pixel_values"], alone["pixel_values"])
    assert torch.equal(threaded["image_grid_thw"], alone["image_grid_thw"])
