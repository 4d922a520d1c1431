"""The epoch plan: which samples each rank reads, in which batches, in which order.

Everything here is arithmetic on sample ids (positions in manifest order) and
token counts from the index: no data is read, and every rank and worker
computes the same plan from the same inputs.

The rule, per epoch:

1. **Order.** Shards are permuted by ``(seed, epoch)``; their samples are
   concatenated and then permuted within consecutive windows of
   ``shuffle_window`` samples. Without shuffling, the order is manifest order.
2. **Ranks.** The samples still to be read this epoch (all of them, unless
   resuming) are cut into ``world`` contiguous runs of ``n = M // world``
   samples; the ``M mod world`` left over (fewer than one per rank) are not read
   this epoch.
3. **Batches.** A rank's run becomes its batch sequence: ``batch_size``
   samples, or, with a token budget, samples sorted by length within windows
   of ``bucket_window`` and grouped so that ``len(batch) * longest <=
   max_tokens``, or, with packing, the samples of each window packed first-fit
   decreasing into sequences of at most ``pack_tokens`` tokens (a sample is
   never split), ``sequences_per_batch`` sequences a batch. With shuffling,
   the batches of each window are put in an order drawn from
   ``(seed, epoch, level, rank)``.
4. **Equal steps.** Every rank stops after the same number of batches (the
   smallest rank's), so distributed training never waits on a missing batch.

The plan does not depend on how many processes read it: with ``W`` DataLoader
workers, batch ``i`` of the sequence is read by worker ``i mod W``, the order
in which the DataLoader hands the workers' batches out, so the batches (their
order and contents) are the same with any number of workers.

Progress is recorded as *levels*: ``(world, batches consumed per rank)``.
Resuming on the same world size continues the last level; on another, the
samples not yet consumed start a new level, so an elastic resume loses and
repeats nothing. (States saved before the plan was independent of the workers
record their level's worker count as ``parts``: each rank's run was cut into
that many contiguous parts, batched apart and taken in turn; they are replayed
as they were read.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from shardkit.errors import ConfigError


@dataclass(frozen=True)
class Batching:
    """How samples are grouped: ``batch_size`` samples, a ``max_tokens`` budget (padded tokens), or
    ``sequences_per_batch`` packed sequences of at most ``pack_tokens`` tokens each.

    A packed batch is a list of sequences, each an array of sample ids; any
    other batch is one array of sample ids.
    """

    batch_size: int | None = None
    max_tokens: int | None = None
    max_batch_size: int | None = None
    bucket_window: int = 512
    pack_tokens: int | None = None
    sequences_per_batch: int = 1

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.batch_size, self.max_tokens, self.pack_tokens)) != 1:
            raise ConfigError("give exactly one of batch_size, max_tokens and pack_tokens")
        for name in ("batch_size", "max_tokens", "max_batch_size", "bucket_window", "pack_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.sequences_per_batch < 1:
            raise ConfigError(f"sequences_per_batch must be positive, got {self.sequences_per_batch}")
        if self.sequences_per_batch != 1 and self.pack_tokens is None:
            raise ConfigError("sequences_per_batch needs pack_tokens")

    @property
    def token_limit(self) -> int | None:
        """The most tokens one sample may have: ``max_tokens`` or ``pack_tokens`` (None when batching by count)."""
        return self.max_tokens or self.pack_tokens


@dataclass(frozen=True)
class Shuffle:
    """Deterministic shuffling from ``seed`` and the epoch."""

    enabled: bool = True
    seed: int = 0
    window: int = 2048

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"shuffle window must be positive, got {self.window}")


@dataclass(frozen=True)
class Level:
    """One stretch of an epoch run on ``world`` ranks: ``batches`` consumed by every rank.

    ``parts`` is 1 except in levels of states saved before the plan was
    independent of the DataLoader workers (module rule, last paragraph).
    """

    world: int
    batches: int = 0
    parts: int = 1


def epoch_order(shard_sizes: Sequence[int], shuffle: Shuffle, epoch: int) -> np.ndarray:
    """Sample ids of the whole epoch, in reading order (see the module rule, step 1)."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    if not shuffle.enabled:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng([shuffle.seed, epoch])
    shards = rng.permutation(len(sizes))
    stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards] or [np.zeros(0, np.int64)])
    keys = rng.random(total)
    return stream[np.lexsort((keys, np.arange(total) // shuffle.window))]


Batch = np.ndarray | list[np.ndarray]  # sample ids, or packed sequences of sample ids


def batch_samples(batch: Batch) -> np.ndarray:
    """The sample ids of a batch, packed or not, in reading order."""
    return np.concatenate(batch) if isinstance(batch, list) else batch


def padded_tokens(batch: Batch, lengths: np.ndarray) -> int:
    """Tokens of ``batch`` once collated into rows padded to the longest: samples, or packed sequences."""
    rows = [int(lengths[s].sum()) for s in batch] if isinstance(batch, list) else lengths[batch].tolist()
    return len(rows) * max(rows)


def pack_sequences(samples: np.ndarray, lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """``samples`` packed first-fit decreasing into sequences of at most ``capacity`` tokens.

    Each sample is whole in exactly one sequence; a sample longer than
    ``capacity`` is alone in its sequence.
    """
    order = samples[np.argsort(-lengths[samples], kind="stable")]
    room = np.empty(len(order), dtype=np.int64)  # free tokens of each sequence opened so far
    sequences: list[list[int]] = []
    for sample in order:
        length = int(lengths[sample])
        fits = np.flatnonzero(room[: len(sequences)] >= length)
        if len(fits):
            target = int(fits[0])
        else:
            target = len(sequences)
            sequences.append([])
            room[target] = capacity
        sequences[target].append(int(sample))
        room[target] -= length
    return [np.asarray(s, dtype=np.int64) for s in sequences]


def _batches(
    part: np.ndarray, batching: Batching, lengths: np.ndarray | None, rng: np.random.Generator | None
) -> list[Batch]:
    if batching.batch_size is not None:
        return [part[i : i + batching.batch_size] for i in range(0, len(part), batching.batch_size)]
    if lengths is None:
        raise ConfigError("batching by max_tokens or pack_tokens needs the samples' token counts")
    out: list[Batch] = []
    for w in range(0, len(part), batching.bucket_window):
        window = part[w : w + batching.bucket_window]
        if batching.pack_tokens is not None:
            sequences = pack_sequences(window, lengths, batching.pack_tokens)
            step = batching.sequences_per_batch
            packed: list[Batch] = [sequences[i : i + step] for i in range(0, len(sequences), step)]
            if rng is not None:
                packed = [packed[i] for i in rng.permutation(len(packed))]
            out += packed
            continue
        budget = int(batching.max_tokens or 0)  # set: Batching has exactly one of the three
        window = window[np.argsort(lengths[window], kind="stable")]
        batches, current, longest = [], [], 0
        for sample in window:
            length = int(lengths[sample])
            fits = (len(current) + 1) * max(longest, length) <= budget
            room = batching.max_batch_size is None or len(current) < batching.max_batch_size
            if current and not (fits and room):
                batches.append(np.asarray(current, dtype=np.int64))
                current, longest = [], 0
            current.append(sample)
            longest = max(longest, length)
        if current:
            batches.append(np.asarray(current, dtype=np.int64))
        if rng is not None:  # similar lengths stay together; their order is shuffled
            batches = [batches[i] for i in rng.permutation(len(batches))]
        out += batches
    return out


def _interleave(parts: list[list[Batch]]) -> list[Batch]:
    out: list[Batch] = []
    for turn in range(max((len(p) for p in parts), default=0)):
        out += [p[turn] for p in parts if turn < len(p)]
    return out


def rank_sequences(
    remaining: np.ndarray,
    world: int,
    batching: Batching,
    lengths: np.ndarray | None,
    *,
    seed: int | None,
    key: Sequence[int],
    parts: int = 1,
) -> list[list[Batch]]:
    """Each rank's batch sequence over ``remaining`` (module rule, steps 2 to 4).

    ``seed`` None keeps buckets in length order; otherwise their batch order is
    shuffled by ``(seed, *key, rank)``. ``parts`` > 1 replays a level of an
    older state (module rule, last paragraph).
    """
    per_rank = len(remaining) // world
    sequences = []
    for rank in range(world):
        run = remaining[rank * per_rank : (rank + 1) * per_rank]
        batches = []
        for part_number, part in enumerate(np.array_split(run, parts)):
            rng = None if seed is None else np.random.default_rng([seed, *key, rank, part_number])
            batches.append(_batches(part, batching, lengths, rng))
        sequences.append(_interleave(batches))
    steps = min(len(s) for s in sequences)
    return [s[:steps] for s in sequences]


@dataclass(frozen=True)
class EpochPlan:
    """The batches of one rank for the current level, and what the earlier levels consumed."""

    epoch: int
    rank: int
    levels: tuple[Level, ...]  # the current level with 0 batches: the plan does not depend on progress
    sequence: list[Batch]  # this rank's batches in the current level, from its start
    consumed_before: int  # samples consumed in earlier levels, all ranks together
    remaining_at_level: int  # samples not yet consumed when the current level started

    @property
    def steps(self) -> int:
        return len(self.sequence)


def check_epoch(epoch: int) -> None:
    """:class:`ConfigError` unless ``epoch`` is a number an epoch can have (0, 1, ...)."""
    if epoch < 0:
        raise ConfigError(f"epoch must be 0 or more, got {epoch}")


def make_plan(
    shard_sizes: Sequence[int],
    lengths: np.ndarray | None,
    *,
    epoch: int,
    levels: Sequence[Level],
    rank: int,
    shuffle: Shuffle,
    batching: Batching,
    order: np.ndarray | None = None,
) -> EpochPlan:
    """Replay ``levels`` of ``epoch`` and return this rank's plan for the last one.

    ``order`` replaces step 1 of the rule (the epoch's ids in reading order, each
    once; a mix of builds makes its own, see :mod:`shardkit.load.mix`).
    """
    check_epoch(epoch)
    if not levels:
        raise ConfigError("a plan needs at least one level")
    if not 0 <= rank < levels[-1].world:
        raise ConfigError(f"rank {rank} is outside world size {levels[-1].world}")
    if order is None:
        order = epoch_order(shard_sizes, shuffle, epoch)
    remaining = order
    seed = shuffle.seed if shuffle.enabled else None
    consumed = 0
    for number, level in enumerate(levels[:-1]):
        sequences = rank_sequences(
            remaining, level.world, batching, lengths, seed=seed, key=(epoch, number), parts=level.parts
        )
        done = np.concatenate(
            [batch_samples(b) for s in sequences for b in s[: level.batches]] or [np.zeros(0, np.int64)]
        )
        consumed += len(done)
        remaining = remaining[~np.isin(remaining, done)]
    last = levels[-1]
    sequences = rank_sequences(
        remaining, last.world, batching, lengths, seed=seed, key=(epoch, len(levels) - 1), parts=last.parts
    )
    return EpochPlan(epoch, rank, tuple(levels), sequences[rank], consumed, len(remaining))


def plan_settings(shuffle: Shuffle, batching: Batching) -> dict:
    """The plan settings a resume state must match."""
    settings = asdict(batching)
    if batching.pack_tokens is None:  # as before packing existed, so that older states still load
        del settings["pack_tokens"], settings["sequences_per_batch"]
    return {"shuffle": asdict(shuffle), "batching": settings}
