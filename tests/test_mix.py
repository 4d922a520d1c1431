"""A weighted mix of real builds: exact shares, repetition and subsampling, split, resume, refusals."""

import json
import logging
import os
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest

from shardkit.cli import main
from shardkit.errors import ConfigError
from shardkit.load.mix import MixStream, open_stream, read_mix_file, share_counts
from shardkit.load.plan import batch_samples
from shardkit.load.torch import TorchLoader
from shardkit.train import TrainConfig
from tests.helpers import torchrun


@pytest.fixture(scope="module")
def tiny(small_dataset, tmp_path_factory, make_build):
    """Builds of 3 records of ``small_dataset``: ``same`` (mixable with ``builds``), ``all`` (train_on all)."""
    root = tmp_path_factory.mktemp("tiny")
    lines = small_dataset.jsonl.read_text().splitlines()[:3]
    jsonl = root / "three.jsonl"
    jsonl.write_text("\n" * 100 + "\n".join(lines) + "\n")  # keys (line numbers) 101-103: unlike the big build's
    image_root = str(small_dataset.jsonl.parent)
    return {
        name: make_build(jsonl, image_root=image_root, samples_per_shard=2, train_on=train_on)
        for name, train_on in (("same", "all_assistant"), ("all", "all"))
    }


def keys(batches):
    return [s.key for batch in batches for s in batch]


def ids(stream, epoch):
    return np.concatenate([batch_samples(b) for b in stream.whole_epoch(epoch).sequence])


def test_largest_remainder_counts():
    assert share_counts([0.6, 0.3, 0.1], 10) == [6, 3, 1]
    assert share_counts([1, 1, 1], 10) == [4, 3, 3]  # a tie goes to the lower build number
    assert share_counts([0.5, 0.25, 0.25], 7) == [3, 2, 2]  # floors 3, 1, 1; remainders .5, .75, .75
    assert sum(share_counts([0.07, 0.93], 101)) == 101


def test_an_epoch_realises_the_weights_exactly_on_builds_of_very_different_sizes(builds, tiny):
    big, small = builds["tar"], tiny["same"]  # 47 and 3 samples
    stream = MixStream([big, small], weights=[0.5, 0.5], epoch_size=40, batch_size=4, seed=3)
    assert stream.counts == [20, 20]
    seen_big = []
    for epoch in range(3):
        builds_of = stream.source.build_of(ids(stream, epoch))
        assert Counter(builds_of.tolist()) == {0: 20, 1: 20}  # exact, every epoch
        epoch_ids = ids(stream, epoch)
        small_ids = epoch_ids[builds_of == 1]
        if epoch == 0:  # the small build is repeated: 20 slots = 6 whole passes over its 3 samples and 2 more
            assert sorted(Counter(small_ids.tolist()).values()) == [6, 7, 7]
        big_ids = epoch_ids[builds_of == 0]
        if epoch < 2:  # epochs 0 and 1 read positions 0-39 of the first pass: subsampled without repeats
            assert len(set(big_ids.tolist())) == 20
        seen_big += big_ids.tolist()
    # across epochs the big build's run continues: 60 reads cover all 47 samples, then 13 start a new pass
    assert len(set(seen_big)) == 47 and len(seen_big) == 60
    # the small build's run over epochs 0 and 1: each pass of 3 is a permutation, in a new order each time
    run = np.concatenate([stream._build_run(1, e) for e in range(2)])
    passes = [run[start : start + 3].tolist() for start in range(0, 39, 3)]
    assert all(sorted(p) == [47, 48, 49] for p in passes) and len({tuple(p) for p in passes}) > 1
    # no shuffling: the builds are spread evenly and read in manifest order
    plain = MixStream([big, small], weights=[0.75, 0.25], epoch_size=8, batch_size=8, shuffle=False)
    assert ids(plain, 0).tolist() == [0, 1, 47, 2, 3, 4, 48, 5]


def test_default_mix_reads_each_build_once_and_the_stream_is_deterministic(builds, tiny):
    stream = MixStream([builds["parquet"], tiny["same"]], batch_size=5, seed=1)
    assert stream.counts == [47, 3]
    assert sorted(ids(stream, 0).tolist()) == list(range(50))
    again = MixStream([builds["parquet"], tiny["same"]], batch_size=5, seed=1)
    assert keys(stream) == keys(again)
    assert stream.source_counts.tolist() == [47, 3]
    other_seed = MixStream([builds["parquet"], tiny["same"]], batch_size=5, seed=2)
    assert ids(other_seed, 0).tolist() != ids(stream, 0).tolist()
    assert ids(stream, 1).tolist() != ids(stream, 0).tolist()


@pytest.mark.parametrize("options", [{"batch_size": 3}, {"max_tokens": 1200}, {"pack_tokens": 1200}])
def test_same_order_with_0_and_2_workers_and_after_resume_on_other_ranks(builds, tiny, options):
    def mix(**more):
        return MixStream([builds["tar"], tiny["same"]], weights=[2, 1], epoch_size=30, seed=4, **options, **more)

    def collate(batch):
        return [s.key for s in (sum(batch, []) if isinstance(batch[0], list) else batch)]

    def flat(batches):
        return [k for batch in batches for k in collate(batch)]

    def loader_keys(stream, workers):
        return [k for batch in TorchLoader(stream, collate=collate, num_workers=workers) for k in batch]

    stream = mix()
    stream.set_epoch(1)
    zero = loader_keys(stream, 0)
    stream = mix()
    stream.set_epoch(1)
    two = loader_keys(stream, 2)
    # the plan's order, whatever the number of workers
    plan = mix()
    expected = [plan.source.get(int(i)).key for b in plan.whole_epoch(1).sequence for i in batch_samples(b)]
    assert two == expected == zero
    # resume mid-epoch with 2 workers: the rest is exactly the uninterrupted rest
    stream = mix()
    stream.set_epoch(1)
    loader = TorchLoader(stream, collate=collate, num_workers=2)
    it = iter(loader)
    head = [k for _ in range(3) for k in next(it)]
    del it
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = mix()
    resumed_loader = TorchLoader(resumed, collate=collate, num_workers=2)
    resumed_loader.load_state_dict(state)
    assert head + [k for b in resumed_loader for k in b] == two
    # elastic: 2 ranks read a batch each, then 3 ranks finish the epoch; nothing lost or read twice
    ranks = [mix(rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    read = []
    for r in ranks:
        read += flat([next(iter(r))])
    state = ranks[0].state_dict()
    assert state["epoch"] == 1 and state["levels"] == [{"world": 2, "batches": 1}]
    for r in range(3):
        later = mix(rank=r, world_size=3)
        later.load_state_dict(state)
        read += flat(later)
    slots = mix()
    _, slot_ids = slots.epoch_slots(1)
    every = Counter(slots.source.get(int(i)).key for i in slot_ids)
    assert not Counter(read) - every  # nothing read more often than the epoch holds it
    assert sum((every - Counter(read)).values()) < 3 * 4  # at most the split's remainder is left


def test_incompatible_builds_are_refused_naming_the_difference(builds, tiny, qwen3_build):
    with pytest.raises(ConfigError, match=r"train_on differs \(all vs all_assistant\)"):
        MixStream([builds["tar"], tiny["all"]], batch_size=2)
    with pytest.raises(ConfigError, match="model family differs"):
        MixStream([builds["tar"], qwen3_build], batch_size=2)
    with pytest.raises(ConfigError, match="2 weights for 1 builds|1 weights for 2 builds"):
        MixStream([builds["tar"], tiny["same"]], weights=[1], batch_size=2)
    with pytest.raises(ConfigError, match="positive"):
        MixStream([builds["tar"], tiny["same"]], weights=[1, 0], batch_size=2)
    with pytest.raises(ConfigError, match="twice"):
        MixStream([builds["tar"], builds["tar"]], batch_size=2)


def test_one_build_under_two_spellings_or_as_a_copy_is_refused(builds, tmp_path, capsys):
    build = builds["tar"]
    os.symlink(build, tmp_path / "link")
    copy = shutil.copytree(build, tmp_path / "copy")
    relative = os.path.relpath(build)
    for other, why in (
        (build + "/", "the same folder"),
        (build + "/.", "the same folder"),
        (str(tmp_path / "link"), "the same folder"),
        (relative, "the same folder"),
        (str(copy), "copies of one build (the same manifest)"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"{build} and {other} are {why}: ")):
            MixStream([build, other], batch_size=2)
        assert main(["stats", build, other]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "every sample would be read twice an epoch" in err


def test_a_resume_state_of_another_mix_is_refused(builds, tiny):
    state = MixStream([builds["tar"], tiny["same"]], weights=[1, 1], batch_size=2).state_dict()
    other = MixStream([builds["tar"], tiny["same"]], weights=[1, 2], batch_size=2)
    with pytest.raises(ConfigError, match="other shuffle/batching settings"):
        other.load_state_dict(state)


def test_a_mix_refuses_cached_image_embeddings(builds, tiny, tmp_path):
    # refused before the cache is opened: a mix reads pixels
    with pytest.raises(ConfigError, match="for one build"):
        TrainConfig.create(data=[builds["tar"], tiny["same"]], image_embeddings=str(tmp_path / "emb"), model="m",
                           output=str(tmp_path / "run"))  # fmt: skip


def test_mix_files_json_and_yaml(builds, tiny, tmp_path):
    (tmp_path / "mix.yaml").write_text(
        f"epoch_size: 20\nbuilds:\n  - path: {builds['tar']}\n    weight: 0.9\n"
        f"  - path: {tiny['same']}\n    weight: 0.1\n"
    )
    stream = open_stream([], mix_file=str(tmp_path / "mix.yaml"), batch_size=4)
    assert isinstance(stream, MixStream) and stream.counts == [18, 2]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mix.json").write_text(json.dumps({"builds": [{"path": "../b", "weight": 1}]}))
    assert read_mix_file(str(tmp_path / "sub" / "mix.json")).builds[0].path.endswith("sub/../b")
    (tmp_path / "bad.json").write_text(json.dumps({"builds": [{"path": "x", "weight": -1}]}))
    with pytest.raises(ConfigError, match=r"bad.json is not valid: builds.0.weight"):
        read_mix_file(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="not both"):
        open_stream([builds["tar"]], mix_file=str(tmp_path / "mix.yaml"), batch_size=4)


def test_stats_describes_a_mix(builds, tiny, capsys):
    assert main(["stats", builds["tar"], tiny["same"], "--weights", "0.5,0.5", "--epoch-size", "40", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["mix"]
    assert [r["slots"] for r in rows] == [20, 20] and [r["share"] for r in rows] == [0.5, 0.5]
    assert rows[1]["distinct"] == 3 and rows[0]["distinct"] == 20


def test_mix_statistics_are_bounded_and_bad_values_are_one_line_errors(builds, tiny, capsys):
    mix = [builds["tar"], tiny["same"]]
    for options, message in (
        (["--epoch-size", str(10**15)], "epoch_size 1000000000000000 is more than the plan of an epoch can hold in "),
        (["--epoch", "-1"], "epoch must be 0 or more, got -1"),
    ):
        assert main(["stats", *mix, *options]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and f"shardkit: error: {message}" in err
    with pytest.raises(ConfigError, match="the plan of an epoch can hold"):
        MixStream(mix, epoch_size=10**12, batch_size=1)
    for weights in ("-1,2", "-0.5,1", "-1e-3,2"):  # a value, not an option argparse does not know
        assert main(["stats", *mix, "--weights", weights]) == 2
        assert capsys.readouterr().err.startswith("shardkit: error: weights must be positive numbers, got [-")
    # weights are normalised before use: their sum cannot overflow
    assert main(["stats", *mix, "--weights", "1e308,1e308", "--epoch-size", "40", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["mix"]
    assert [r["slots"] for r in rows] == [20, 20] and [r["target_share"] for r in rows] == [0.5, 0.5]
    assert share_counts([3e307, 1e307], 8) == [6, 2]


def test_a_weight_too_small_for_one_sample_an_epoch_is_warned_of(builds, tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="shardkit.load.mix"):
        stream = MixStream([builds["tar"], tiny["same"]], weights=[1, 1e-320], batch_size=2)
    assert stream.counts == [50, 0]
    assert caplog.messages == [
        f"{tiny['same']} gets no sample in an epoch of 50 (its share of the weights is 1e-320): "
        "raise its weight or the epoch size"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardkit.load.mix"):
        MixStream([builds["tar"], tiny["same"]], weights=[1, 0.05], batch_size=2)
    assert caplog.messages == []


def test_train_refuses_a_bad_mix_in_one_line(builds, tiny, tmp_path, capsys):
    base = ["train", "--model", "unused", "--output", str(tmp_path / "out")]
    assert main(base) == 2
    assert "no training data" in capsys.readouterr().err
    assert main([*base, "--data", builds["tar"], "--data", tiny["same"], "--weights", "1"]) == 2
    assert "1 weights for 2 builds" in capsys.readouterr().err
    assert main([*base, "--data", builds["tar"], "--data", tiny["all"]]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "train_on differs" in err and err.count("\n") == 1


@pytest.mark.slow
def test_two_gloo_ranks_read_the_planned_split_of_a_mix(builds, tiny, tmp_path):
    args = [builds["tar"], tiny["same"], str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*torchrun(2), "tests/distributed_mix.py", *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        planned = MixStream(
            [builds["tar"], tiny["same"]], weights=[2, 1], epoch_size=30, batch_size=3, seed=4, rank=rank, world_size=2
        )
        ids = np.concatenate(planned.whole_epoch(1).sequence)
        assert got["keys"] == [planned.source.get(int(i)).key for i in ids]  # the plan simulated in one process
        assert got["sources"] == np.bincount(planned.source.build_of(ids), minlength=2).tolist()


def test_a_resume_state_late_in_a_mix_epoch_larger_than_its_builds_is_accepted(builds, tiny):
    """A mix's state is checked against the mix's own plan (its epoch_size), not its builds laid end to end."""

    def stream():
        return MixStream([builds["tar"], tiny["same"]], weights=[1, 1], epoch_size=120, batch_size=4, seed=5)

    first = stream()
    total = len(first.source)
    assert first.steps_in_epoch(0) * 4 > total  # the mix's epoch has more batches than the builds hold samples
    whole = [[s.key for s in batch] for batch in first]
    late = stream()
    batches = iter(late)
    taken = [[s.key for s in next(batches)] for _ in range(total // 4 + 2)]  # past what the builds alone would plan
    resumed = stream()
    resumed.load_state_dict(json.loads(json.dumps(late.state_dict())))
    assert taken + [[s.key for s in batch] for batch in resumed] == whole
