"""Processes on one machine (torchrun, gloo): an epoch split into disjoint, equal, complete parts; resuming on
more ranks than samples left."""

import json
import subprocess
from pathlib import Path

import pytest

from shardkit.load import ShardStream
from shardkit.synthetic import make_clinical_dataset
from tests.helpers import torchrun

pytestmark = pytest.mark.slow  # torchrun process groups


@pytest.fixture(scope="module")
def epoch_build(tmp_path_factory, make_build):
    """44 samples in shards of 6."""
    folder = tmp_path_factory.mktemp("distributed")
    data = make_clinical_dataset(folder / "data", cases=44, seed=5, megapixels=(0.004, 0.02), images_per_case=(1, 2))
    return data, Path(make_build(data.jsonl, samples_per_shard=6))


def run_ranks(ranks, out, tmp_path, *extra):
    result = subprocess.run(
        [*torchrun(ranks), str(Path(__file__).with_name("distributed_epoch.py")), str(out), str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_two_ranks_cover_an_epoch_disjointly_and_equally(epoch_build, tmp_path):
    data, out = epoch_build
    ranks = run_ranks(2, out, tmp_path)
    a, b = (set(r["keys"]) for r in ranks)
    assert len(ranks[0]["keys"]) == len(a) == len(b) == 22
    assert not a & b
    assert a | b == {f"{line:010d}" for line in data.good_lines}
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["state"]["epoch"] == 1


def test_resuming_on_more_ranks_than_samples_left_moves_on_to_the_next_epoch(epoch_build, tmp_path):
    data, out = epoch_build
    stream = ShardStream(str(out), batch_size=2, seed=11)
    for _ in range(stream.remaining_steps() - 1):  # 2 samples of epoch 0 left, for 3 ranks
        stream.advance()
    state = tmp_path / "state.json"
    state.write_text(json.dumps(stream.state_dict()))
    ranks = run_ranks(3, out, tmp_path, str(state))
    seen = [set(r["keys"]) for r in ranks]
    assert [len(r["keys"]) for r in ranks] == [len(s) for s in seen] == [14, 14, 14]  # all of epoch 1, 44 // 3 each
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert all(r["state"] == ranks[0]["state"] for r in ranks) and ranks[0]["state"]["epoch"] == 2
