"""Run by tests/test_mix.py under torchrun: one epoch of a mix per gloo rank, keys written per rank."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from shardkit.load.mix import MixStream
from shardkit.load.torch import TorchLoader
from shardkit.model import leave_distributed, setup_distributed


def keys(samples):
    return [s.key for s in samples]


def main(big: str, small: str, out: str) -> None:
    setup_distributed("gloo")
    stream = MixStream([big, small], weights=[2, 1], epoch_size=30, batch_size=3, seed=4)
    loader = TorchLoader(stream, collate=keys, num_workers=2)
    loader.set_epoch(1)
    seen = [k for batch in loader for k in batch]
    record = {"keys": seen, "sources": stream.source_counts.tolist()}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    leave_distributed()  # the ranks in turn: gloo can abort when two tear down at once


if __name__ == "__main__":
    main(*sys.argv[1:])
