"""Run by tests/test_eval.py under torchrun: the evaluation of a model over gloo ranks, the result per rank."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from shardkit.model import leave_distributed, load_model, setup_distributed
from shardkit.shards import read_manifest
from shardkit.train.local import Evaluation, evaluate


def main(model: str, build: str, out: str) -> None:
    setup_distributed("gloo")
    evaluation = Evaluation(build, read_manifest(build), batch_size=2)
    result = evaluate(load_model(model), evaluation, torch.device("cpu"))
    mine = [int(i) for b in evaluation.mine for i in evaluation.batches[b]]
    record = {"loss": result.loss, "tokens": result.tokens, "samples": result.samples, "mine": mine}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    leave_distributed()  # the ranks in turn: gloo can abort when two tear down at once


if __name__ == "__main__":
    main(*sys.argv[1:])
