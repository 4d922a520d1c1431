"""Cached image embeddings against the live frozen vision tower, on CPU.

Target (a ratio measured in this run):
  8. a training step with the vision tower frozen is >= 1.3 x faster fed cached embeddings than fed pixels (the
     same batches of images up to 256 tokens each, the same small random Qwen2-VL). Its language model is small,
     but its output layer over the real 152k vocabulary costs about as much per token as the vision tower does per
     image token, so the gap is far smaller than on the published models on a GPU (bench_gpu.py).
Also measured: the embed pass's images/s (model loading included) and the cache's bytes per image token.
"""

from __future__ import annotations

import shutil
import time
from itertools import islice

import torch
from common import WORK, machine, save, seed_dataset

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.embed import EmbedConfig
from shardkit.embed.run import embed
from shardkit.load import ShardStream
from shardkit.load.batch import Collator, EmbeddingCollator
from shardkit.load.embeddings import EmbeddedSource
from shardkit.model import vision_tower
from shardkit.shards import read_manifest
from shardkit.testing import REAL_VOCAB_SIZE, VISION_TOKEN_IDS

STEPS = 3


def small_model():
    """A random Qwen2-VL scaled down from the 2B architecture (vision 32 x 1280 -> 8 x 448; text 28 x 1536 ->
    1 x 128), with the real vocabulary (whose output layer is most of the text model's cost here)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = {"depth": 8, "embed_dim": 448, "hidden_size": 128, "num_heads": 7, "mlp_ratio": 4, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3}  # fmt: skip
    text = {"vocab_size": REAL_VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}, "rope_theta": 10000.0}  # fmt: skip
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **VISION_TOKEN_IDS)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config)


def step_seconds(model, batches, prepare) -> float:
    """Seconds of a forward + backward, the fastest over ``batches`` after one warm-up step (the least disturbed
    by a noisy machine)."""
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(**prepare(batch)).loss.backward()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(2)
    data = seed_dataset("embed", cases=6, seed=4, megapixels=(0.2, 0.3))
    folder = WORK / "embed"
    shutil.rmtree(folder, ignore_errors=True)
    # images of 0.2-0.3 MP, up to 256 tokens each (Qwen2-VL's default allows 1280)
    config = BuildConfig.create(input=str(data.jsonl), out=str(folder / "build"), max_pixels=200704)
    build(config, progress=False)
    model = small_model()
    model.save_pretrained(folder / "model")
    started = time.perf_counter()
    options = {"build": str(folder / "build"), "model": str(folder / "model"), "out": str(folder / "emb")}
    cache = embed(EmbedConfig.create(**options, dtype="float32", batch_images=16), progress=False)
    embed_seconds = time.perf_counter() - started

    vision_tower(model).requires_grad_(False)
    manifest = read_manifest(folder / "build")
    take = STEPS + 1
    live_batches = list(islice(ShardStream(str(folder / "build"), batch_size=1, seed=0), take))
    stream = ShardStream(EmbeddedSource(str(folder / "build"), str(folder / "emb")), batch_size=1, seed=0)
    cached_batches = list(islice(stream, take))
    live_collate, cached_collate = Collator.for_build(manifest), EmbeddingCollator.for_build(manifest)
    live = step_seconds(model, live_batches, live_collate)
    cached = step_seconds(model, cached_batches, lambda b: cached_collate.model_inputs(model, cached_collate(b)))
    bytes_total = sum(s.bytes for s in cache.shards)
    result = {
        "machine": machine(),
        "embed": {
            "model": "Qwen2-VL, vision 8 x 448, text 1 x 128 (random)",
            "steps_measured": STEPS,
            "live_frozen_step_s": live,
            "cached_step_s": cached,
            "ratio_step_cached_vs_live": live / cached,
            "embed_images": cache.num_images,
            "embed_seconds": embed_seconds,
            "embed_images_per_s": cache.num_images / embed_seconds,
            "cache_bytes_per_image_token_float32": bytes_total / cache.num_image_tokens,
        },
    }
    save("embed", result)


if __name__ == "__main__":
    main()
