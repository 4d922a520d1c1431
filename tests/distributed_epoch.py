"""Run by tests/test_distributed.py under torchrun: reading over gloo until an epoch, keys written per rank.

``distributed_epoch.py BUILD OUT [STATE]``: optionally resume from the loader state in file STATE, then read
as a training loop does (``while loader.epoch < until``) until the epoch after the one the loader starts in
is over. Every step does an all_reduce, as DDP would, so a rank with fewer batches would hang the run; a
pass over the loader that makes no progress (an epoch that never ends) fails it.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from shardkit.load import ShardStream
from shardkit.load.torch import TorchLoader
from shardkit.model import leave_distributed, setup_distributed


def keys(samples):
    return [s.key for s in samples]


def main(build: str, out: str, state: str | None = None) -> None:
    setup_distributed("gloo")
    rank = dist.get_rank()
    loader = TorchLoader(ShardStream(build, batch_size=2, seed=11), collate=keys, num_workers=1)
    start = 0
    if state:
        saved = json.loads(Path(state).read_text())
        loader.load_state_dict(saved)
        start = saved["epoch"] + 1
    seen, passes = [], 0
    while loader.epoch < start + 1:
        passes += 1
        assert passes <= 3, f"rank {rank}: epoch {loader.epoch} never ends"
        for batch in loader:
            step = torch.ones(1)
            dist.all_reduce(step)
            assert step.item() == dist.get_world_size()
            seen += batch
    Path(out, f"rank{rank}.json").write_text(json.dumps({"keys": seen, "state": loader.state_dict()}))
    leave_distributed()  # the ranks in turn: gloo can abort when two tear down at once


if __name__ == "__main__":
    main(*sys.argv[1:])
