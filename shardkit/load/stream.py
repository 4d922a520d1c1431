"""The streaming dataset: batches of samples for one rank, shuffled, split and resumable.

:class:`ShardStream` reads a build (folder or fsspec URL, tar or Parquet) and
yields lists of :class:`~shardkit.shards.Sample` (with packing, lists of packed
sequences of samples) following :mod:`shardkit.load.plan`. Its state is a small
JSON dict::

    {"version": 1, "epoch": 3, "levels": [{"world": 8, "batches": 1200}],
     "plan": {...settings...}, "num_samples": 123456, "build": "<manifest digest>",
     "skipped": {"corrupt": 2}}

Restoring it continues with exactly the batches an uninterrupted run would
have produced (same world size, any number of DataLoader workers), or, on another world size, with the
samples not yet read in this epoch, none lost and none twice; when fewer
samples are left than ranks, the epoch is over and the next one starts.
Restoring re-reads nothing: the plan is arithmetic and samples are found by the
index. A state is checked before it is used: a malformed one, one from another
build (``build``: the manifest's digest) or one claiming more batches than
its epoch has is refused with a :class:`ConfigError`. The state is the same on
every rank but for ``skipped``: the samples this rank dropped (``on_error="skip"``).

The torch loader (:mod:`shardkit.load.torch`) and the Tinker batches
(:mod:`shardkit.load.tinker`) are built on it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from shardkit.errors import ConfigError, ShardError
from shardkit.load.plan import (
    Batch,
    Batching,
    EpochPlan,
    Level,
    Shuffle,
    batch_samples,
    make_plan,
    padded_tokens,
    plan_settings,
)
from shardkit.load.source import BuildSource, Source
from shardkit.model import rank_world
from shardkit.shards import Sample

logger = logging.getLogger(__name__)

STATE_VERSION = 1
SKIPPABLE = ("corrupt", "missing")  # the kinds of ShardError that on_error="skip" drops: the data's, not the setup's


@dataclass(frozen=True)
class ReadBatch:
    """The samples read for one plan batch (a list, or one list per packed sequence), and how many were
    skipped, by kind (``on_error="skip"``)."""

    samples: list[Any]
    skipped: dict[str, int] = field(default_factory=dict)


class _LevelState(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    world: int = Field(ge=1)
    # the level's parts (see shardkit.load.plan), in levels of older states only; written "workers" until renamed
    parts: int = Field(1, ge=1, validation_alias=AliasChoices("parts", "workers"))
    batches: int = Field(ge=0)


class _State(BaseModel):
    """A loader state as :meth:`ShardStream.state_dict` writes it (``build`` absent in states of older versions)."""

    model_config = ConfigDict(strict=True)
    version: Literal[1]
    epoch: int = Field(ge=0)
    levels: list[_LevelState] = Field(min_length=1)
    plan: dict[str, Any]
    num_samples: int = Field(ge=0)
    build: str | None = None
    skipped: dict[str, Annotated[int, Field(ge=0)]] = {}


def _parse_state(state: Any) -> _State:
    """``state`` checked field by field; :class:`ConfigError` saying what is wrong."""
    if not isinstance(state, dict):
        raise ConfigError(f"a loader state is a dict, got {type(state).__name__}")
    if state.get("version") != STATE_VERSION:
        raise ConfigError(f"unsupported loader state version {state.get('version')!r}")
    try:
        return _State.model_validate(state)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise ConfigError(f"invalid loader state: {where}: {error['msg']}") from None


def _level_state(level: Level) -> dict[str, int]:
    """A level as the state records it (``parts`` only for a level of an older state, see :class:`Level`)."""
    state = {"world": level.world, "batches": level.batches}
    return state if level.parts == 1 else {**state, "parts": level.parts}


class ShardStream:
    """Batches of samples of one rank.

    Give ``batch_size`` (samples per batch), ``max_tokens`` (a padded-token
    budget: ``len(batch) * longest <= max_tokens``, samples of similar length
    batched together) or ``pack_tokens`` (``sequences_per_batch`` sequences of
    whole samples, at most ``pack_tokens`` tokens each; a batch is then a list
    of sequences, each a list of samples). ``rank``/``world_size`` default to
    ``torch.distributed``. The batches do not depend on how many processes
    read them (:meth:`batches`). Every sample is checked against its
    checksum (``checksums=False`` skips that, for measuring its cost);
    ``verify=True`` also checks every shard's sha256 once, up front.
    ``location`` may also be a source already opened (a :class:`BuildSource`,
    or a stage over one such as :class:`~shardkit.load.embeddings.EmbeddedSource`):
    the stream reads its samples as they come; ``verify`` and ``checksums`` are
    then the source's own.

    ``on_error`` says what a sample that cannot be read does: ``"raise"`` (the
    default) raises its :class:`~shardkit.errors.ShardError`; ``"skip"`` drops
    it from its batch with a warning naming the shard and the sample, and counts
    it in :attr:`skipped` by kind (``corrupt``: damaged bytes; ``missing``: its
    shard is gone). A shard that may not be read (permission, credentials) or
    cannot be reached (network) raises either way, and so does a batch left
    with no sample at all (a batch is never dropped, so that every rank takes
    the same steps). :attr:`skipped` counts this rank's drops since the stream
    started, resumes included (it is kept in :meth:`state_dict`).
    """

    def __init__(
        self,
        location: str | Source,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        max_batch_size: int | None = None,
        bucket_window: int = 512,
        pack_tokens: int | None = None,
        sequences_per_batch: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_window: int = 2048,
        rank: int | None = None,
        world_size: int | None = None,
        verify: bool = False,
        checksums: bool = True,
        on_error: Literal["raise", "skip"] = "raise",
    ):
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: Counter[str] = Counter()
        self.source = self._open_source(location, verify, checksums)
        self.batching = Batching(
            batch_size=batch_size,
            max_tokens=max_tokens,
            max_batch_size=max_batch_size,
            bucket_window=bucket_window,
            pack_tokens=pack_tokens,
            sequences_per_batch=sequences_per_batch,
        )
        self.shuffle = Shuffle(shuffle, seed, shuffle_window)
        auto_rank, auto_world = rank_world()
        self.rank = auto_rank if rank is None else rank
        self.world_size = auto_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")
        lengths = self.source.index.num_tokens
        limit = self.batching.token_limit
        if limit is not None and len(lengths) and int(lengths.max()) > limit:
            name = "max_tokens" if max_tokens is not None else "pack_tokens"
            raise ConfigError(
                f"{name} {limit} is below the longest sample ({int(lengths.max())} tokens); "
                "raise it to at least the build's max_length"
            )
        self.build_id = self.source.manifest.digest
        self.epoch = 0
        self._levels: list[Level] = [Level(self.world_size)]
        self._plan: EpochPlan | None = None

    def _open_source(self, location: Any, verify: bool, checksums: bool) -> Source:
        """The samples the stream reads: the build at ``location``, or ``location`` itself when it is a source (a mix
        of builds opens several)."""
        if isinstance(location, str):
            return BuildSource(location, verify=verify, checksums=checksums)
        if verify or not checksums:
            raise ConfigError("verify and checksums are options of opening a build: give them to its source")
        return location

    # -- state ---------------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        return plan_settings(self.shuffle, self.batching)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (no-op if it is the current epoch)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._levels = [Level(self.world_size)]
            self._plan = None

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: JSON-serialisable, the same on every rank."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "levels": [_level_state(level) for level in self._levels],
            "plan": self.settings,
            "num_samples": len(self.source),
            "build": self.build_id,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` on this build, possibly of another topology);
        :class:`ConfigError` when it is malformed, from another build or inconsistent with its epoch."""
        parsed = _parse_state(state)
        if parsed.build is None:
            logger.warning("the loader state names no build (saved by an older shardkit): checked by its size only")
        elif parsed.build != self.build_id:
            raise ConfigError(
                f"the state is from another build (digest {parsed.build}), not {self.source.location} "
                f"(digest {self.build_id})"
            )
        if parsed.num_samples != len(self.source):
            raise ConfigError(
                f"the state is for a build of {parsed.num_samples} samples, this one has {len(self.source)}"
            )
        if parsed.plan != self.settings:
            raise ConfigError(
                f"the state was saved with other shuffle/batching settings ({parsed.plan}); "
                "resume with the same settings to get the same batches"
            )
        levels = [Level(level.world, level.batches, level.parts) for level in parsed.levels]
        for number, level in enumerate(levels):
            # rank 0: every rank has the same steps, and this rank may be outside an earlier level's world
            steps = self._make_plan(parsed.epoch, [*levels[:number], replace(level, batches=0)], rank=0).steps
            if level.batches > steps:
                raise ConfigError(
                    f"the state says {level.batches} batches were read on {level.world} ranks, "
                    f"but that part of epoch {parsed.epoch} has {steps}"
                )
        self.epoch = parsed.epoch
        self._levels = levels
        self.skipped = Counter(parsed.skipped)
        self._plan = None
        self.plan()  # on this topology: a remainder with nothing left for it moves on to the next epoch now

    # -- planning --------------------------------------------------------------------------

    def plan(self) -> EpochPlan:
        """This rank's plan for the current epoch and world size."""
        last = self._levels[-1]
        if (last.world, last.parts) != (self.world_size, 1):
            level = Level(self.world_size)
            self._levels = self._levels[:-1] + [level] if last.batches == 0 else self._levels + [level]
            self._plan = None
        fresh = [*self._levels[:-1], replace(self._levels[-1], batches=0)]
        if self._plan is None or self._plan.epoch != self.epoch or list(self._plan.levels) != fresh:
            self._plan = self._make_plan(self.epoch, fresh)
        done = self._levels[-1].batches
        if done > self._plan.steps:
            raise ConfigError(f"the state says {done} batches were read, but this epoch has {self._plan.steps}")
        if done == self._plan.steps and (done or len(self._levels) > 1):  # nothing left (fewer samples than ranks)
            self.set_epoch(self.epoch + 1)
            return self.plan()
        return self._plan

    def advance(self, batches: int = 1, *, skipped: Mapping[str, int] | None = None) -> None:
        """Record that ``batches`` more batches were consumed (and the samples ``skipped`` in reading them, by
        kind); moves to the next epoch at the end."""
        plan = self.plan()
        done = self._levels[-1].batches + batches
        if done > plan.steps:
            raise ConfigError(f"advanced past the end of epoch {self.epoch} ({plan.steps} batches)")
        self.skipped.update(skipped or {})
        self._levels[-1] = replace(self._levels[-1], batches=done)
        if done == plan.steps:
            self.set_epoch(self.epoch + 1)

    def whole_epoch(self, epoch: int) -> EpochPlan:
        """This rank's plan for a whole ``epoch`` on the current world size, progress aside."""
        return self._make_plan(epoch, [Level(self.world_size)])

    def _make_plan(self, epoch: int, levels: list[Level], rank: int | None = None) -> EpochPlan:
        """This rank's (or ``rank``'s) plan of ``epoch`` after replaying ``levels`` (a mix of builds makes its own)."""
        return make_plan(
            self.source.shard_sizes,
            self._lengths(),
            epoch=epoch,
            levels=levels,
            rank=self.rank if rank is None else rank,
            shuffle=self.shuffle,
            batching=self.batching,
        )

    def steps_in_epoch(self, epoch: int) -> int:
        """Batches per rank in a whole ``epoch`` on the current world size (progress aside)."""
        return self.whole_epoch(epoch).steps

    def padding_stats(self, epoch: int | None = None) -> dict[str, Any]:
        """Padding of this rank's batches over a whole epoch (the current one by default), as collated.

        ``tokens`` are the samples' tokens, ``padded_tokens`` those of the
        collated rows (each batch padded to its longest row: a sample, or a
        packed sequence), ``pad_fraction`` the share of padding in them.
        """
        lengths = self.source.index.num_tokens
        batches = self.whole_epoch(self.epoch if epoch is None else epoch).sequence
        samples = [batch_samples(b) for b in batches]
        tokens = sum(int(lengths[s].sum()) for s in samples)
        padded = sum(padded_tokens(b, lengths) for b in batches)
        return {
            "batches": len(batches),
            "samples": sum(len(s) for s in samples),
            "tokens": tokens,
            "padded_tokens": padded,
            "pad_fraction": 1 - tokens / padded if padded else 0.0,
        }

    def _lengths(self) -> np.ndarray | None:
        return None if self.batching.token_limit is None else self.source.index.num_tokens

    def remaining_steps(self) -> int:
        """Batches left in the current epoch for this rank."""
        return self.plan().steps - self._levels[-1].batches

    # -- reading ---------------------------------------------------------------------------

    def read(self, batch: Batch) -> ReadBatch:
        """The samples of a plan batch (a list, or one list per packed sequence) and those skipped, by kind."""
        skipped: Counter[str] = Counter()
        if isinstance(batch, list):
            sequences = [self._read_ids(sequence, skipped) for sequence in batch]
            samples: list[Any] = [sequence for sequence in sequences if sequence]
        else:
            samples = self._read_ids(batch, skipped)
        if not samples:
            raise ShardError(
                f"on_error='skip' dropped every sample of a batch ({dict(skipped)}): too much of the build cannot be "
                "read to go on (shardkit verify names the damaged files)"
            )
        return ReadBatch(samples, dict(skipped))

    def _read_ids(self, ids: np.ndarray, skipped: Counter[str]) -> list[Sample]:
        out = []
        for sample_id in ids:
            try:
                out.append(self.source.get(int(sample_id)))
            except ShardError as exc:
                if self.on_error == "raise" or exc.kind not in SKIPPABLE:
                    raise
                logger.warning("skipped sample %d (on_error='skip'): %s", sample_id, exc)
                skipped[exc.kind] += 1
        return out

    def batches(self, *, worker: int = 0, workers: int = 1) -> Iterator[ReadBatch]:
        """The rest of this epoch's batches for one of ``workers`` readers: counting from the first batch not
        yet consumed, batch ``j`` goes to reader ``j mod workers`` (the order in which a DataLoader hands out
        its workers' outputs, so the sequence is the same for any number of workers).

        Does not record progress (readers run in worker processes); the
        consumer calls :meth:`advance` with each batch's ``skipped``.
        """
        plan = self.plan()
        start = self._levels[-1].batches
        for j in range(start + worker, plan.steps, workers):
            yield self.read(plan.sequence[j])

    def __iter__(self) -> Iterator[list[Sample] | list[list[Sample]]]:
        """The rest of the current epoch in this process, recording progress as batches are taken."""
        for batch in self.batches():
            self.advance(skipped=batch.skipped)
            yield batch.samples


class StreamBatches:
    """Base of the loaders over a :class:`ShardStream`: epoch and resume state are the stream's."""

    stream: ShardStream

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.stream.remaining_steps()
