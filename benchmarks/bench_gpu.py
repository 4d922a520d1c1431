"""Frozen vision tower on a GPU: training tokens/s with live pixels (tower trained, tower frozen) vs cached embeddings.

    python benchmarks/bench_gpu.py                      # CUDA; skipped with a message when there is none
    python benchmarks/bench_gpu.py --device cpu --tiny  # a smoke run of the same code on CPU with tiny models

Randomly initialised models of the published Qwen2-VL-2B and Qwen2.5-VL-3B architectures (their config.json values,
written below; nothing is downloaded), bf16 weights and autocast, sdpa, gradient checkpointing, AdamW, fed by shardkit's
TorchLoader (2 workers, pinned memory) from a build of the seed-layout demo set (1-6 photos of 0.3-3 MP a case).
Per family and mode: tokens/s, the share of the step spent waiting for the loader, peak GPU memory; and the embed
pass's images/s (model loading included). Target on one H100: cached >= 4 x live frozen in tokens/s, data wait < 5%.
Results: benchmarks/results/gpu.json (not part of run_all.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
from common import WORK, machine, save, seed_dataset

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.embed import EmbedConfig
from shardkit.embed.run import embed
from shardkit.load import ShardStream
from shardkit.load.batch import Collator, EmbeddingCollator
from shardkit.load.embeddings import EmbeddedSource
from shardkit.load.torch import TorchLoader
from shardkit.model import vision_tower
from shardkit.testing import REAL_VOCAB_SIZE, VISION_TOKEN_IDS, tiny_qwen2_vl_config

TOKENS = VISION_TOKEN_IDS  # fmt: skip
MROPE = {"type": "mrope", "mrope_section": [16, 24, 24]}
# Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct config.json
PUBLISHED = {
    "qwen2_vl": {
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
                          "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "text_config": {"vocab_size": REAL_VOCAB_SIZE, "hidden_size": 1536, "intermediate_size": 8960,
                        "num_hidden_layers": 28,
                        "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": MROPE,
                        "tie_word_embeddings": True, "hidden_act": "silu"},
        "tie_word_embeddings": True,
    },
    "qwen2_5_vl": {
        "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                          "tokens_per_second": 2, "hidden_act": "silu"},
        "text_config": {"vocab_size": REAL_VOCAB_SIZE, "hidden_size": 2048, "intermediate_size": 11008,
                        "num_hidden_layers": 36,
                        "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
                        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": MROPE,
                        "tie_word_embeddings": True, "hidden_act": "silu"},
        "tie_word_embeddings": True,
    },
}  # fmt: skip
NAMES = {"qwen2_vl": "Qwen2-VL-2B", "qwen2_5_vl": "Qwen2.5-VL-3B"}


def make_model(family: str, tiny: bool) -> torch.nn.Module:
    """A randomly initialised model of the published architecture (or the tests' tiny one)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(0)
    if tiny:
        config = tiny_qwen2_vl_config(family)
    else:
        config = (Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig)(**PUBLISHED[family], **TOKENS)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    return cls(config)


def run_mode(model, loader: TorchLoader, prepare, device: torch.device, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps (after 2 warm-up steps); tokens/s, data-wait share, peak memory."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = iter(loader)
    wait = busy = 0.0
    tokens = 0
    for step in range(steps + 2):
        sync()
        start = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        inputs = prepare(loader.collate.to_device(batch, device))
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        end = time.perf_counter()
        if step >= 2:
            wait += got - start
            busy += end - start
            tokens += loader.collate.count(batch)[1]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del optimizer
    return {"tokens_per_s": tokens / busy, "data_wait_share": wait / busy, "step_s": busy / steps, "peak_gib": peak}


def bench_family(family: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    data = seed_dataset("gpu-tiny" if args.tiny else "gpu", cases=args.cases, seed=0,
                        megapixels=(0.05, 0.2) if args.tiny else (0.3, 3.0))  # fmt: skip
    folder = WORK / f"gpu-{family}{'-tiny' if args.tiny else ''}"
    shutil.rmtree(folder, ignore_errors=True)
    build(BuildConfig.create(input=str(data.jsonl), out=str(folder / "build"), model=family), progress=False)
    model = make_model(family, args.tiny)
    model.save_pretrained(folder / "model")
    started = time.perf_counter()
    options = {"build": str(folder / "build"), "model": str(folder / "model"), "out": str(folder / "emb")}
    cache = embed(EmbedConfig.create(**options, batch_images=args.batch_images), progress=False)
    embed_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)  # bf16 weights: 3B + AdamW fit
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    name = NAMES[family] + (" (tiny)" if args.tiny else "")
    results: dict[str, Any] = {"model": name, "embed_images": cache.num_images,
                               "embed_images_per_s": cache.num_images / embed_s}  # fmt: skip
    for mode in ("live_trained", "live_frozen", "cached"):
        vision_tower(model).requires_grad_(mode == "live_trained")
        shards = str(folder / "build")
        source = EmbeddedSource(shards, str(folder / "emb")) if mode == "cached" else shards
        stream = ShardStream(source, batch_size=1, seed=0)
        if mode == "cached":
            collate = EmbeddingCollator.for_build(stream.source.manifest)
            prepare = lambda inputs, c=collate, m=model: c.model_inputs(m, inputs)  # noqa: E731
        else:
            collate = Collator.for_build(stream.source.manifest, pixels="uint8")
            prepare = lambda inputs: inputs  # noqa: E731
        loader = TorchLoader(stream, collate=collate, num_workers=args.workers, pin_memory=device.type == "cuda")
        results[mode] = run_mode(model, loader, prepare, device, args.steps)
        print(f"{results['model']} {mode}: {results[mode]}", flush=True)
    results["ratio_cached_vs_live_frozen"] = results["cached"]["tokens_per_s"] / results["live_frozen"]["tokens_per_s"]
    results["ratio_cached_vs_live_trained"] = (
        results["cached"]["tokens_per_s"] / results["live_trained"]["tokens_per_s"]
    )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models and small images (a smoke run)")
    parser.add_argument("--families", nargs="+", default=["qwen2_vl", "qwen2_5_vl"], choices=list(PUBLISHED))
    parser.add_argument("--steps", type=int, default=20, help="measured steps per mode (default: %(default)s)")
    parser.add_argument("--cases", type=int, default=60, help="cases in the data set (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default: %(default)s)")
    parser.add_argument("--batch-images", type=int, default=32, help="images per embed call (default: %(default)s)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here; skipped (use --device cpu --tiny for a smoke run)")
        return 0
    device = torch.device(args.device)
    families = {family: bench_family(family, args, device) for family in args.families}
    save("gpu-tiny" if args.tiny else "gpu", {"machine": machine(), "device": _device_name(device), **families})
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main())
