"""The streaming dataset over real builds: split, shuffle, exact and elastic resume, bad shards."""

import json
import logging
import re
import shutil

import pytest

from shardkit.cli import main
from shardkit.errors import ConfigError, ShardError
from shardkit.load import ShardStream, verify_build
from shardkit.shards import read_manifest


def keys(batches):
    return [[s.key for s in batch] for batch in batches]


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_one_epoch_reads_every_sample_once_in_a_seeded_order(builds, small_dataset, fmt):
    stream = ShardStream(builds[fmt], batch_size=4, seed=1)
    epoch0 = keys(stream)
    flat = [k for b in epoch0 for k in b]
    assert sorted(flat) == sorted(f"{line:010d}" for line in small_dataset.good_lines)
    assert stream.epoch == 1  # the finished epoch moved the stream on
    assert keys(ShardStream(builds[fmt], batch_size=4, seed=1)) == epoch0
    epoch1 = keys(stream)
    assert sorted(k for b in epoch1 for k in b) == sorted(flat) and epoch1 != epoch0
    assert keys(ShardStream(builds[fmt], batch_size=4, seed=2)) != epoch0
    in_order = [k for b in keys(ShardStream(builds[fmt], batch_size=4, shuffle=False)) for k in b]
    assert in_order == sorted(in_order)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_restoring_mid_epoch_gives_the_same_remaining_batches(builds, fmt):
    uninterrupted = keys(_epoch(builds[fmt], 2))
    stream = ShardStream(builds[fmt], batch_size=3, seed=5)
    stream.set_epoch(2)
    it = iter(stream)
    first = keys([next(it) for _ in range(6)])
    state = json.loads(json.dumps(stream.state_dict()))  # survives JSON
    assert state["epoch"] == 2 and state["levels"] == [{"world": 1, "batches": 6}]
    resumed = ShardStream(builds[fmt], batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert first + keys(resumed) == uninterrupted


def _epoch(location, epoch, **options):
    stream = ShardStream(location, batch_size=3, seed=5, **options)
    stream.set_epoch(epoch)
    return list(stream)


def test_resuming_deep_into_an_epoch_reads_only_what_it_returns(builds, monkeypatch):
    stream = ShardStream(builds["tar"], batch_size=2, seed=0)
    steps = stream.remaining_steps()
    for _ in range(int(steps * 0.9)):
        stream.advance()
    state = stream.state_dict()
    resumed = ShardStream(builds["tar"], batch_size=2, seed=0)
    resumed.load_state_dict(state)
    reads = []
    original = resumed.source.get
    monkeypatch.setattr(resumed.source, "get", lambda i: reads.append(i) or original(i))
    first = next(iter(resumed))
    assert len(reads) == len(first) == 2  # no replay of the 90% before


def test_ranks_split_an_epoch_into_disjoint_equal_parts(builds, small_dataset):
    world = 3
    per_rank = [
        keys(ShardStream(builds["parquet"], batch_size=2, rank=r, world_size=world, seed=9)) for r in range(world)
    ]
    assert len({len(p) for p in per_rank}) == 1
    assert len({sum(map(len, p)) for p in per_rank}) == 1
    flat = [k for p in per_rank for b in p for k in b]
    assert len(flat) == len(set(flat))
    assert len(small_dataset.good_lines) - len(flat) < world * 2


def test_elastic_resume_on_another_world_size_finishes_the_epoch(builds, small_dataset):
    location = builds["tar"]
    first = [ShardStream(location, batch_size=2, rank=r, world_size=2, seed=3) for r in range(2)]
    taken = []
    for stream in first:
        it = iter(stream)
        taken += [k for _ in range(5) for k in (s.key for s in next(it))]
    state = first[0].state_dict()
    assert state == first[1].state_dict()  # every rank holds the same state
    rest = []
    for r in range(3):
        stream = ShardStream(location, batch_size=2, rank=r, world_size=3, seed=3)
        stream.load_state_dict(state)
        rest += [s.key for b in stream for s in b]
    seen = taken + rest
    assert len(seen) == len(set(seen))
    assert len(small_dataset.good_lines) - len(seen) < 3 * 2


def test_token_budget_batches(builds):
    manifest = read_manifest(builds["tar"])
    stream = ShardStream(builds["tar"], max_tokens=4 * manifest.config.max_length, seed=0)
    batches = list(stream)
    assert all(len(b) * max(len(s.input_ids) for s in b) <= 4 * 2048 for b in batches)
    assert sum(map(len, batches)) == manifest.num_samples
    with pytest.raises(ConfigError, match="below the longest sample"):
        ShardStream(builds["tar"], max_tokens=64)


def test_state_from_other_settings_is_refused(builds):
    state = ShardStream(builds["tar"], batch_size=2).state_dict()
    with pytest.raises(ConfigError, match="other shuffle/batching settings"):
        ShardStream(builds["tar"], batch_size=3).load_state_dict(state)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_truncated_or_corrupt_shards_fail_naming_the_shard(builds, tmp_path, fmt):
    copy = tmp_path / "copy"
    shutil.copytree(builds[fmt], copy)
    manifest = read_manifest(str(copy))
    victim = copy / manifest.shards[3].path
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    with pytest.raises(ShardError, match=manifest.shards[3].path):
        list(ShardStream(str(copy), batch_size=4, shuffle=False))
    problems = verify_build(str(copy))
    assert len(problems) == 1 and manifest.shards[3].path in problems[0]


def test_verify_catches_a_changed_byte(builds, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(builds["tar"], copy)
    assert verify_build(str(copy)) == []
    assert main(["verify", str(copy)]) == 0
    manifest = read_manifest(str(copy))
    victim = copy / manifest.shards[1].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        list(ShardStream(str(copy), batch_size=4, shuffle=False, verify=True))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    assert manifest.shards[1].path in capsys.readouterr().out


def test_missing_build_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardStream(str(tmp_path), batch_size=1)


def test_packed_stream_gives_sequences_of_whole_samples_and_resumes_exactly(builds, small_dataset):
    def stream():
        return ShardStream(builds["parquet"], pack_tokens=600, sequences_per_batch=2, seed=3, bucket_window=16)

    batches = [[[s.key for s in seq] for seq in batch] for batch in stream()]
    lengths = {s.key: len(s.input_ids) for batch in stream() for seq in batch for s in seq}
    assert all(1 <= len(b) <= 2 and all(sum(lengths[k] for k in seq) <= 600 for seq in b) for b in batches)
    flat = [k for b in batches for seq in b for k in seq]
    assert sorted(flat) == sorted(f"{line:010d}" for line in small_dataset.good_lines)
    assert sum(len(b) for b in batches) < len(flat) / 2  # several samples a sequence

    first = stream()
    it = iter(first)
    taken = [[[s.key for s in seq] for seq in next(it)] for _ in range(2)]
    resumed = stream()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert taken + [[[s.key for s in seq] for seq in b] for b in resumed] == batches
    with pytest.raises(ConfigError, match="other shuffle/batching settings"):
        ShardStream(builds["parquet"], pack_tokens=700, seed=3).load_state_dict(first.state_dict())
    with pytest.raises(ConfigError, match="pack_tokens 64 is below the longest sample"):
        ShardStream(builds["parquet"], pack_tokens=64)


def test_padding_stats_count_what_the_batches_hold(builds):
    stats = {}
    for name, options in {
        "plain": {"batch_size": 4},
        "budget": {"max_tokens": 800},
        "packed": {"pack_tokens": 800, "sequences_per_batch": 2},
    }.items():
        stream = ShardStream(builds["tar"], seed=1, **options)
        stats[name] = stream.padding_stats()
        rows = []
        for batch in stream:
            sequences = batch if isinstance(batch[0], list) else [[s] for s in batch]
            rows.append([sum(len(s.input_ids) for s in seq) for seq in sequences])
        expected_padded = sum(len(r) * max(r) for r in rows)
        assert stats[name]["padded_tokens"] == expected_padded
        assert stats[name]["tokens"] == sum(map(sum, rows)) == int(stream.source.index.num_tokens.sum())
        assert stats[name]["batches"] == len(rows) and stats[name]["samples"] == len(stream.source)
        assert stats[name]["pad_fraction"] == pytest.approx(1 - stats[name]["tokens"] / expected_padded)
    assert stats["packed"]["pad_fraction"] < stats["plain"]["pad_fraction"]
    assert stats["budget"]["pad_fraction"] < stats["plain"]["pad_fraction"]


@pytest.mark.parametrize("world", [2, 3, 5, 8])
def test_resuming_on_more_ranks_than_samples_left_starts_the_next_epoch(builds, world):
    from shardkit.load.plan import Level, make_plan

    first = ShardStream(builds["tar"], batch_size=2, seed=4)
    steps = first.remaining_steps()  # 47 samples: 23 batches of 2, one of 1
    for _ in range(steps - 1):
        first.advance()
    state = first.state_dict()
    levels = [*(Level(**level) for level in state["levels"]), Level(world)]
    left = make_plan(first.source.shard_sizes, None, epoch=0, levels=levels, rank=0, shuffle=first.shuffle,
                     batching=first.batching)  # fmt: skip
    assert left.remaining_at_level == 1 and left.steps == 0  # fewer samples left than ranks
    seen, states = [], []
    for rank in range(world):
        stream = ShardStream(builds["tar"], batch_size=2, seed=4, rank=rank, world_size=world)
        stream.load_state_dict(state)
        assert stream.epoch == 1 and stream.remaining_steps() > 0  # the empty remainder ended epoch 0
        seen += [s.key for batch in stream for s in batch]
        states.append(stream.state_dict())
    assert len(seen) == len(set(seen)) == 47 // world * world  # the whole of epoch 1, split across the ranks
    assert all(s == states[0] for s in states) and states[0]["epoch"] == 2


def test_a_malformed_or_foreign_state_is_refused(builds, caplog):
    stream = ShardStream(builds["tar"], batch_size=2, seed=4)
    for _ in range(3):
        stream.advance()
    good = stream.state_dict()

    def changed(**parts):
        state = json.loads(json.dumps(good))
        for path, value in parts.items():
            *where, last = path.split("__")
            target = state
            for key in where:
                target = target[int(key)] if isinstance(target, list) else target[key]
            if value is None:
                del target[last]
            else:
                target[last] = value
        return state

    cases = {
        "levels.0.batches: Input should be greater than or equal to 0": changed(levels__0__batches=-1),
        "the state says 1000 batches were read on 1 ranks, but that part of epoch 0 has 24": changed(
            levels__0__batches=1000
        ),
        "epoch: Input should be a valid integer": changed(epoch="1"),
        "epoch: Input should be greater than or equal to 0": changed(epoch=-1),
        "levels: Input should be a valid list": changed(levels="x"),
        "levels: List should have at least 1 item": changed(levels=[]),
        "levels.0.world: Field required": changed(levels__0__world=None),
        "plan: Field required": changed(plan=None),
        "unsupported loader state version": changed(version=None),
        "a loader state is a dict, got list": [],
    }
    for message, state in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            ShardStream(builds["tar"], batch_size=2, seed=4).load_state_dict(state)
    other = ShardStream(builds["parquet"], batch_size=2, seed=4)  # the same samples, count and settings
    with pytest.raises(ConfigError, match="the state is from another build"):
        other.load_state_dict(good)
    resumed = ShardStream(builds["tar"], batch_size=2, seed=4)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(changed(build=None))  # a state saved before states named their build
    assert "names no build" in caplog.text and resumed.remaining_steps() == 21


def test_a_state_saved_when_the_plan_depended_on_the_workers_resumes_with_nothing_lost_or_repeated(builds):
    from shardkit.load.plan import Level, batch_samples, make_plan

    stream = ShardStream(builds["tar"], batch_size=2, seed=4)
    state = stream.state_dict()
    state["levels"] = [{"world": 1, "workers": 2, "batches": 3}]  # as saved by a loader on 2 DataLoader workers
    old = make_plan(stream.source.shard_sizes, None, epoch=0, levels=[Level(1, 0, parts=2)], rank=0,
                    shuffle=stream.shuffle, batching=stream.batching)  # fmt: skip
    read_before = [int(i) for b in old.sequence[:3] for i in batch_samples(b)]
    resumed = ShardStream(builds["tar"], batch_size=2, seed=4)
    resumed.load_state_dict(state)
    it = iter(resumed)
    first = next(it)
    assert resumed.state_dict()["levels"] == [{"world": 1, "batches": 3, "parts": 2}, {"world": 1, "batches": 1}]
    again = ShardStream(builds["tar"], batch_size=2, seed=4)
    again.load_state_dict(resumed.state_dict())  # the state as written now, "parts" for "workers"
    assert again.state_dict() == resumed.state_dict()
    keys_before = {resumed.source.get(i).key for i in read_before}
    rest = [s.key for s in first] + [s.key for b in it for s in b]
    assert len(rest) == len(set(rest)) and not keys_before & set(rest)
    assert len(rest) + len(keys_before) == len(resumed.source)  # one rank: nothing left over
