"""Target 4: the image hot path (a stored JPEG to model-ready patches) against its physical floor and its baseline.

  floor     decoding the stored JPEG alone (Pillow / libjpeg-turbo, to an RGB array): no loader can do less per image.
  shardkit  uint8: decode + cut into patches in the processor's order (what DataLoader workers do; normalising then
            happens on the GPU, see bench_gpu.py); float32: the same, normalised and repeated in time on the CPU.
  baseline  transformers' Qwen2VLImageProcessor, its torchvision ("fast") class, the default where torchvision is
            installed (as it is beside a CUDA torch); its PIL class, Qwen2VLImageProcessorPil, is reported too.

Target: the uint8 hot path within 1.3 x the decode floor (``ratio_hot_path_vs_decode_floor`` <= 1.3). Needs
torchvision: run it with .venv-newest's python (benchmarks/run_all.py does).
"""

from __future__ import annotations

import importlib.util
import io
import sys
import time

import numpy as np
import torch
from bench_loader import loader_build
from common import best_of, machine, save, seed_dataset
from PIL import Image

from shardkit.load import BuildSource
from shardkit.load.batch import expand_patches, image_patches


def main() -> dict:
    if importlib.util.find_spec("torchvision") is None:
        sys.exit("bench_image.py compares with transformers' torchvision image processor: run it in an environment "
                 "with torchvision (bin/test's .venv-newest)")  # fmt: skip
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    jpegs = [j for s in BuildSource(str(loader_build(seed_dataset()))).samples() for j in s.images]
    fast, pil = Qwen2VLImageProcessor(), Qwen2VLImageProcessorPil()
    mean, std = fast.image_mean, fast.image_std
    runs = {
        "decode_floor": lambda: [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs],
        "uint8": lambda: [image_patches(j, 14, 2) for j in jpegs],
        "float32": lambda: [expand_patches(torch.from_numpy(image_patches(j, 14, 2)), mean, std) for j in jpegs],
        "processor_torchvision": lambda: [fast(images=[Image.open(io.BytesIO(j))], return_tensors="pt") for j in jpegs],
        "processor_pil": lambda: [pil(images=[Image.open(io.BytesIO(j))], return_tensors="np") for j in jpegs],
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(4):  # interleaved, the best of each: noise only ever slows a run down
        for name, run in runs.items():
            best[name] = min(best[name], best_of(run, 1))
    ms = {name: seconds / len(jpegs) * 1e3 for name, seconds in best.items()}
    return {
        "images": len(jpegs),
        "megapixels": sum(np.prod(Image.open(io.BytesIO(j)).size) for j in jpegs) / 1e6,
        "torch_threads": torch.get_num_threads(),
        **{f"{name}_ms_per_image": value for name, value in ms.items()},
        "ratio_hot_path_vs_decode_floor": best["uint8"] / best["decode_floor"],
        "ratio_float32_hot_path_vs_decode_floor": best["float32"] / best["decode_floor"],
        "ratio_processor_torchvision_vs_hot_path": best["processor_torchvision"] / best["uint8"],
        "ratio_processor_torchvision_vs_float32_hot_path": best["processor_torchvision"] / best["float32"],
        "ratio_processor_pil_vs_hot_path": best["processor_pil"] / best["uint8"],
    }


if __name__ == "__main__":
    started = time.perf_counter()
    result = {"machine": machine(), "image": main()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    save("image", result)
