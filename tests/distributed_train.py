"""Run by tests/test_train_local.py under torchrun: ``shardkit train`` stopped on every rank right after a step,
as a crash would stop it.

``distributed_train.py STOP TRAIN_OPTIONS...``: the options of ``shardkit train``; the run exits with status 3
after step STOP (and its checkpoint, if one is due).
"""

import sys

from shardkit.cli import main
from shardkit.train import local


def stopped(stop: int, args: list[str]) -> None:
    train = local.train

    def stop_after(step, record):
        if step == stop:
            sys.exit(3)

    local.train = lambda config: train(config, on_step=stop_after)  # what the cli calls
    sys.exit(main(["train", *args]))


if __name__ == "__main__":
    stopped(int(sys.argv[1]), sys.argv[2:])
