"""Tinker Datums from shards against tinker-cookbook's conversation_to_datum on the original images.

Target 5 (a ratio measured in this run): Datums per second >= 20 x the cookbook path, which opens every original
image, re-encodes it and asks the image processor for its token count, for every Datum of every epoch.
"""

from __future__ import annotations

import json
import shutil
import time

from common import WORK, machine, save, seed_dataset
from PIL import Image

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.load import ShardStream
from shardkit.load.tinker import DatumBatches
from shardkit.tokenizer import load_tokenizer


def main() -> dict:
    from tinker_cookbook.renderers import TrainOnWhat, get_renderer
    from tinker_cookbook.supervised.data import conversation_to_datum
    from transformers import Qwen2VLImageProcessor

    dataset = seed_dataset()
    out = WORK / "tinker-bench"
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        build(BuildConfig.create(input=str(dataset.jsonl), out=str(out), model="qwen3_vl", samples_per_shard=8),
              progress=False)  # fmt: skip
    tokenizer = load_tokenizer()[0]
    processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      size={"shortest_edge": 65536, "longest_edge": 16777216})  # fmt: skip
    renderer = get_renderer("qwen3_vl_instruct", tokenizer, processor)
    records = [json.loads(line) for line in dataset.jsonl.read_text().splitlines() if line.strip()]

    def cookbook_epoch():
        for record in records:
            messages = []
            for m in record["messages"]:
                content = m["content"]
                if isinstance(content, list):
                    content = [{"type": "image", "image": Image.open(dataset.root / p["image"])} if p["type"] == "image"
                               else p for p in content]  # fmt: skip
                messages.append({"role": m["role"], "content": content})
            conversation_to_datum(messages, renderer, max_length=None, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)

    def shardkit_epoch():
        return sum(len(batch) for batch in DatumBatches(ShardStream(str(out), batch_size=8, seed=0)))

    start = time.perf_counter()
    cookbook_epoch()
    cookbook_s = time.perf_counter() - start
    shardkit_s = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        datums = shardkit_epoch()
        shardkit_s = min(shardkit_s, time.perf_counter() - start)
    return {
        "datums": datums,
        "cookbook_datums_per_s": len(records) / cookbook_s,
        "shardkit_datums_per_s": datums / shardkit_s,
        "ratio_datums_vs_cookbook": (datums / shardkit_s) / (len(records) / cookbook_s),
    }


if __name__ == "__main__":
    started = time.perf_counter()
    result = {"machine": machine(), "tinker": main()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    save("tinker", result)
