"""Evaluation during training: every sample once across ranks, the same loss on 1 and 2 gloo ranks."""

import json
import math
import os
import subprocess

import pytest
import torch

from shardkit.model import load_model
from shardkit.shards import read_manifest
from shardkit.synthetic import make_clinical_dataset
from shardkit.train.evaluate import eval_batches, rank_share
from shardkit.train.local import Evaluation, evaluate
from tests.helpers import torchrun


@pytest.fixture(scope="module")
def seven(tmp_path_factory, make_build, tiny_tokenizer):
    """7 short cases with one small image each: an odd number, so the rank split has a remainder."""
    root = tmp_path_factory.mktemp("seven")
    data = make_clinical_dataset(root / "data", cases=7, seed=5, megapixels=(0.01, 0.02), images_per_case=(1, 1))
    return make_build(data.jsonl, max_pixels=56 * 56, tokenizer=tiny_tokenizer)


@pytest.mark.parametrize("samples", [0, 1, 7, 47])
def test_the_rank_split_covers_every_batch_once(samples):
    batches = eval_batches(samples, 3)
    assert [int(i) for b in batches for i in b] == list(range(samples))
    for world in (1, 2, 3, 5):
        shares = [list(rank_share(len(batches), r, world)) for r in range(world)]
        assert [b for share in shares for b in share] == list(range(len(batches)))  # contiguous, none dropped
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.slow
def test_evaluation_on_two_gloo_ranks_equals_one_process_exactly(seven, tiny_model, tmp_path):
    location = seven  # 7 samples: batches of 2 (the last of 1), 2 on each rank
    result = subprocess.run(
        [*torchrun(2), "tests/distributed_eval.py", tiny_model, location, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(ranks[0]["mine"] + ranks[1]["mine"]) == list(range(7))  # each sample once, on one rank

    model = load_model(tiny_model)
    alone = evaluate(model, Evaluation(location, read_manifest(location), batch_size=2), torch.device("cpu"))
    assert not model.training
    for rank in ranks:
        assert (rank["loss"], rank["tokens"], rank["samples"]) == (alone.loss, alone.tokens, alone.samples)

    # the same number from a plain loop: each sample alone, the model's own mean loss times its target tokens
    evaluation = Evaluation(location, read_manifest(location), batch_size=1)
    total = count = 0.0
    with torch.no_grad():
        for i in range(7):
            sample = evaluation.source.get(i)
            inputs = evaluation.collator.to_device(evaluation.collator([sample]), "cpu")
            targets = int((sample.weights[1:] > 0).sum())
            total += float(model(**inputs).loss) * targets
            count += targets
    assert alone.tokens == count and math.isclose(alone.loss, total / count, rel_tol=1e-5)
