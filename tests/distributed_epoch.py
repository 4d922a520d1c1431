"""Run by tests/test_distributed.py under torchrun: one epoch per rank over gloo, keys written per rank.

Every step does an all_reduce, as DDP would, so a rank with fewer batches would hang the run.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from shardkit.load import ShardStream
from shardkit.load.torch import TorchLoader


def keys(samples):
    return [s.key for s in samples]


def main(build: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = TorchLoader(ShardStream(build, batch_size=2, seed=11), collate=keys, num_workers=1)
    seen = []
    for batch in loader:
        step = torch.ones(1)
        dist.all_reduce(step)
        assert step.item() == dist.get_world_size()
        seen += batch
    Path(out, f"rank{rank}.json").write_text(json.dumps({"keys": seen, "state": loader.state_dict()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
