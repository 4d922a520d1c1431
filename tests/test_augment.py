"""Load-time augmentation: off by default, the same for a sample in an epoch wherever and whenever it is loaded."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from shardkit.errors import ConfigError
from shardkit.load import BuildSource, ShardStream
from shardkit.load.augment import Augment
from shardkit.load.batch import Collator, expand_patches, image_patches
from shardkit.load.torch import TorchLoader
from shardkit.testing import tiny_qwen2_vl_config


class PerSample:
    """The build's collator, its batch's ``pixel_values`` and grids then split by sample key."""

    def __init__(self, manifest, **options):
        self.collate = Collator.for_build(manifest, **options)

    def set_epoch(self, epoch):
        self.collate.set_epoch(epoch)

    def __call__(self, samples):
        batch = self.collate(samples)
        grids = batch["image_grid_thw"]
        images = iter(zip(batch["pixel_values"].split(grids.prod(-1).tolist()), grids, strict=True))
        return {s.key: [next(images) for _ in s.images] for s in samples}


def loader(build, *, augment=None, batch_size=3, workers=0, seed=4):
    stream = ShardStream(build, batch_size=batch_size, seed=seed)
    return TorchLoader(stream, collate=PerSample(stream.source.manifest, augment=augment), num_workers=workers)


def pixels(batches):
    """``{key: [(pixel_values, grid), ...]}`` over batches of :class:`PerSample`."""
    return {key: images for batch in batches for key, images in batch.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert len(a[key]) == len(b[key])
        for (x, grid_x), (y, grid_y) in zip(a[key], b[key], strict=True):
            assert torch.equal(grid_x, grid_y) and torch.equal(x, y), key


def test_off_by_default_and_on_changes_pixels_but_not_shapes(builds):
    stored = {s.key: s for s in BuildSource(builds["tar"]).samples()}
    plain = pixels(loader(builds["tar"]))
    assert loader(builds["tar"]).collate.collate.augment is None
    manifest = ShardStream(builds["tar"], batch_size=1).source.manifest
    mean, std = manifest.config.family.image_mean, manifest.config.family.image_std
    for key, images in plain.items():  # exactly the stored images
        for (values, _), jpeg in zip(images, stored[key].images, strict=True):
            assert torch.equal(values, expand_patches(torch.from_numpy(image_patches(jpeg, 14, 2)), mean, std))
    assert_same(pixels(loader(builds["tar"], augment=Augment(probability=0.0))), plain)

    changed = pixels(loader(builds["tar"], augment=Augment()))
    assert changed.keys() == plain.keys()
    for key in plain:
        for (x, grid_x), (y, grid_y) in zip(changed[key], plain[key], strict=True):
            assert x.shape == y.shape and torch.equal(grid_x, grid_y)
            assert not torch.equal(x, y), key


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
@pytest.mark.slow
def test_same_epoch_same_pixels_across_loaders_workers_batches_and_resume(builds, fmt):
    augment = Augment(rotation=15, brightness=0.3, contrast=0.3)
    whole = pixels(loader(builds[fmt], augment=augment))
    assert_same(pixels(loader(builds[fmt], augment=augment, batch_size=2, workers=2, seed=9)), whole)

    first = loader(builds[fmt], augment=augment, workers=2)
    taken = []
    for batch in first:
        taken.append(batch)
        if len(taken) == 4:
            break
    second = loader(builds[fmt], augment=augment, workers=0)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same(pixels([*taken, *second]), whole)

    assert second.epoch == 1
    later = pixels(second)  # epoch 1
    assert later.keys() == whole.keys()
    for key in whole:
        for (x, _), (y, _) in zip(later[key], whole[key], strict=True):
            assert not torch.equal(x, y), key
    again = loader(builds[fmt], augment=augment, workers=2)
    again.set_epoch(1)
    assert_same(pixels(again), later)


def test_an_augmented_image_keeps_its_size_and_fills_corners_with_the_mean():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    augment = Augment(rotation=30, brightness=0, contrast=0)
    out = augment(image, epoch=0, key="0000000001", index=0, fill=(123, 117, 104))
    assert out.size == image.size and out.mode == "RGB"
    assert augment(image, epoch=0, key="0000000001", index=0, fill=(123, 117, 104)) == out
    assert augment(image, epoch=0, key="0000000001", index=1, fill=(123, 117, 104)) != out
    assert out.getpixel((0, 0)) == (123, 117, 104) or out.getpixel((83, 0)) == (123, 117, 104)
    for bad in ({"rotation": -1}, {"brightness": 1.5}, {"probability": 2}, {"seed": -1}):
        with pytest.raises(ConfigError):
            Augment(**bad)


@pytest.mark.slow
def test_a_tiny_qwen2_vl_trains_on_an_augmented_uint8_batch(builds):
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config())
    stream = ShardStream(builds["tar"], batch_size=3, seed=0)
    collate = Collator.for_build(stream.source.manifest, pixels="uint8", augment=Augment())
    batch = next(iter(TorchLoader(stream, collate=collate)))
    out = model(**collate.to_device(batch, "cpu"))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
