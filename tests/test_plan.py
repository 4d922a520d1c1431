"""The epoch plan: pure arithmetic, checked over many shapes."""

import random
from dataclasses import replace

import numpy as np
import pytest

from shardkit.errors import ConfigError
from shardkit.load.plan import (
    Batching,
    Level,
    Shuffle,
    batch_samples,
    epoch_order,
    make_plan,
    pack_sequences,
    plan_settings,
    rank_sequences,
)

SIZES = [5, 5, 5, 7, 3, 5, 5, 5, 2, 9]


def test_epoch_order_is_a_deterministic_permutation_that_changes_by_epoch():
    shuffle = Shuffle(seed=1, window=8)
    a, b = epoch_order(SIZES, shuffle, 0), epoch_order(SIZES, shuffle, 0)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(sum(SIZES)))
    assert not np.array_equal(a, epoch_order(SIZES, shuffle, 1))
    assert not np.array_equal(a, epoch_order(SIZES, Shuffle(seed=2, window=8), 0))
    assert np.array_equal(epoch_order(SIZES, Shuffle(enabled=False), 5), np.arange(sum(SIZES)))


def test_shuffle_only_mixes_within_windows_of_the_shard_stream():
    # with a window of 1 the order is whole shards in a permuted order
    order = epoch_order(SIZES, Shuffle(seed=4, window=1), 0).tolist()
    starts = np.cumsum([0, *SIZES])
    runs, i = [], 0
    while i < len(order):
        shard = int(np.searchsorted(starts, order[i], side="right") - 1)
        assert order[i : i + SIZES[shard]] == list(range(starts[shard], starts[shard + 1]))
        runs.append(shard)
        i += SIZES[shard]
    assert sorted(runs) == list(range(len(SIZES))) and runs != sorted(runs)


@pytest.mark.parametrize("world, batch", [(1, 4), (2, 3), (4, 1), (3, 5)])
def test_ranks_get_disjoint_equal_steps_and_cover_all_but_the_remainder(world, batch):
    order = epoch_order(SIZES, Shuffle(seed=0), 0)
    sequences = rank_sequences(order, world, Batching(batch_size=batch), None, seed=0, key=(0, 0))
    assert len({len(s) for s in sequences}) == 1
    seen = [int(i) for s in sequences for b in s for i in b]
    assert len(seen) == len(set(seen))
    per_rank = [sum(len(b) for b in s) for s in sequences]
    assert len(set(per_rank)) == 1  # every rank the same number of samples
    assert len(order) - len(seen) < world * batch  # only a remainder is left for a later epoch


def test_token_budget_batches_never_exceed_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 1000, size=300)
    order = epoch_order([100, 100, 100], Shuffle(seed=0), 0)
    sequences = rank_sequences(order, 2, Batching(max_tokens=2048, bucket_window=64), lengths, seed=0, key=(0, 0))
    batches = [b for s in sequences for b in s]
    assert all(len(b) * lengths[b].max() <= 2048 for b in batches)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths[np.concatenate(batches)].sum() / padded > 0.85  # buckets of similar length waste little
    assert len(sequences[0]) == len(sequences[1])


def test_max_batch_size_caps_token_batches():
    lengths = np.full(40, 10)
    (sequence,) = rank_sequences(
        np.arange(40), 1, Batching(max_tokens=1000, max_batch_size=7), lengths, seed=None, key=(0,)
    )
    assert [len(b) for b in sequence] == [7, 7, 7, 7, 7, 5]


def test_first_fit_decreasing_packs_whole_samples_under_the_capacity():
    rng = np.random.default_rng(3)
    for _ in range(50):
        lengths = rng.integers(1, 400, size=200)
        samples = rng.permutation(200)[: rng.integers(1, 200)]
        sequences = pack_sequences(samples, lengths, 1000)
        assert sorted(np.concatenate(sequences).tolist()) == sorted(samples.tolist())
        fill = [int(lengths[s].sum()) for s in sequences]
        assert max(fill) <= 1000
        assert len(sequences) <= 11 / 9 * np.ceil(lengths[samples].sum() / 1000) + 1  # FFD's bound
        for i, s in enumerate(sequences):  # first fit: no sample would have fitted in an earlier sequence
            assert all(1000 - fill[j] < lengths[s].min() for j in range(i))
    assert [s.tolist() for s in pack_sequences(np.array([0, 1, 2]), np.array([5, 9, 6]), 10)] == [[1], [2], [0]]
    assert [s.tolist() for s in pack_sequences(np.array([0, 1, 2]), np.array([7, 6, 3]), 10)] == [[0, 2], [1]]


@pytest.mark.parametrize("world, per_batch", [(1, 1), (2, 2), (3, 4)])
def test_packed_batches_are_sequences_under_the_budget_with_every_sample_once(world, per_batch):
    lengths = np.random.default_rng(0).integers(20, 600, size=sum(SIZES) * 5)
    order = epoch_order([s * 5 for s in SIZES], Shuffle(seed=0), 0)
    batching = Batching(pack_tokens=1024, sequences_per_batch=per_batch, bucket_window=32)
    sequences = rank_sequences(order, world, batching, lengths, seed=0, key=(0, 0))
    assert len({len(s) for s in sequences}) == 1
    batches = [b for s in sequences for b in s]
    assert all(isinstance(b, list) and 1 <= len(b) <= per_batch for b in batches)
    assert all(lengths[seq].sum() <= 1024 for b in batches for seq in b)
    seen = np.concatenate([batch_samples(b) for b in batches])
    assert len(seen) == len(set(seen.tolist()))
    if world == 1:
        assert sorted(seen.tolist()) == sorted(order.tolist())  # one rank reads everything
    assert lengths[seen].sum() / (1024 * sum(len(b) for b in batches)) > 0.9  # the sequences are well filled
    again = rank_sequences(order, world, batching, lengths, seed=0, key=(0, 0))
    assert [[q.tolist() for q in b] for s in again for b in s] == [[q.tolist() for q in b] for b in batches]


def test_bad_batching_is_a_config_error():
    with pytest.raises(ConfigError):
        Batching()
    with pytest.raises(ConfigError):
        Batching(batch_size=2, max_tokens=10)
    with pytest.raises(ConfigError):
        Batching(batch_size=0)
    with pytest.raises(ConfigError):
        Batching(max_tokens=10, pack_tokens=10)
    with pytest.raises(ConfigError):
        Batching(max_tokens=10, sequences_per_batch=2)
    with pytest.raises(ConfigError):
        Batching(pack_tokens=10, sequences_per_batch=0)


def test_settings_without_packing_are_those_of_states_saved_before_packing():
    assert plan_settings(Shuffle(), Batching(batch_size=2))["batching"] == {
        "batch_size": 2,
        "max_tokens": None,
        "max_batch_size": None,
        "bucket_window": 512,
    }
    assert plan_settings(Shuffle(), Batching(pack_tokens=64))["batching"]["pack_tokens"] == 64


def plan_batches(levels, rank, batching, lengths=None, epoch=0):
    plan = make_plan(
        SIZES, lengths, epoch=epoch, levels=levels, rank=rank, shuffle=Shuffle(seed=7, window=6), batching=batching
    )
    return plan


@pytest.mark.parametrize(
    "batching, per_batch",
    [
        (Batching(batch_size=2), 2),
        (Batching(max_tokens=900, bucket_window=8), 9),
        (Batching(pack_tokens=900, sequences_per_batch=2, bucket_window=8), 18),
    ],
)
def test_elastic_resume_loses_and_repeats_nothing(batching, per_batch):
    lengths = np.random.default_rng(1).integers(100, 300, size=sum(SIZES))
    rnd = random.Random(0)
    for _ in range(30):
        first = Level(rnd.randint(1, 4), parts=rnd.choice([1, 1, 2, 3]))  # parts > 1: a level of an older state
        steps = plan_batches([first], 0, batching, lengths).steps
        done = rnd.randint(0, steps)
        second = Level(rnd.randint(1, 4))
        before = [
            make_plan(
                SIZES, lengths, epoch=0, levels=[first], rank=r, shuffle=Shuffle(seed=7, window=6), batching=batching
            ).sequence[:done]
            for r in range(first.world)
        ]
        after = [
            make_plan(
                SIZES,
                lengths,
                epoch=0,
                levels=[replace(first, batches=done), second],
                rank=r,
                shuffle=Shuffle(seed=7, window=6),
                batching=batching,
            )
            for r in range(second.world)
        ]
        seen = [int(i) for seq in before for b in seq for i in batch_samples(b)] + [
            int(i) for p in after for b in p.sequence for i in batch_samples(b)
        ]
        assert len(seen) == len(set(seen)), "a sample was read twice"
        assert after[0].consumed_before == sum(len(batch_samples(b)) for seq in before for b in seq)
        missing = after[0].remaining_at_level - sum(len(batch_samples(b)) for p in after for b in p.sequence)
        # what is left is only the last level's remainder: under one batch per rank
        limit = second.world * per_batch
        assert 0 <= missing < limit and len({p.steps for p in after}) == 1


@pytest.mark.parametrize("batching", [Batching(batch_size=3), Batching(pack_tokens=700, sequences_per_batch=2)])
def test_same_topology_continues_the_same_sequence(batching):
    lengths = np.random.default_rng(2).integers(100, 300, size=sum(SIZES))
    whole = plan_batches([Level(2)], 1, batching, lengths).sequence
    continued = plan_batches([Level(2, 4)], 1, batching, lengths).sequence
    assert [batch_samples(b).tolist() for b in whole] == [batch_samples(b).tolist() for b in continued]
