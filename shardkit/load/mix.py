"""A mix of several builds at chosen weights, streamed like one build.

:class:`MixStream` is a :class:`~shardkit.load.stream.ShardStream` over
builds ``0..K-1`` (sizes ``N_b``, weights ``w_b``). The rule, per epoch ``e``:

1. **Counts.** An epoch has ``E`` slots (``epoch_size``, default the sum of the
   builds' sizes). Build ``b`` gets ``floor(E * w_b / W)`` of them (``W`` the sum
   of the weights), and the ``E`` minus the sum of those floors left over go one
   each to the builds with the largest remainders, lower build number first on a
   tie (the largest remainder method). The counts ``c_b`` are the same every epoch.
2. **Samples.** Each build is read as an endless run of passes; pass ``p`` is
   the build's own epoch order for epoch ``p`` (:func:`~shardkit.load.plan.epoch_order`,
   seeded by ``seed`` and ``b``). Epoch ``e`` takes positions ``[e * c_b, (e + 1) * c_b)``
   of that run: a build smaller than its share is read several times, each
   pass in a new order; a larger one continues where the last epoch stopped, so
   every sample is read once every ``ceil(N_b / c_b)`` epochs.
3. **Interleaving.** The ``k``-th slot of build ``b`` gets the key
   ``(k + u) / c_b`` (``u`` uniform in ``[0, 1)``, drawn from ``(seed, epoch)``;
   0.5 without shuffling) and the epoch reads slots by increasing key: each
   build is spread evenly over the epoch.
4. **Ranks, workers, batches, resume** follow :mod:`shardkit.load.plan` on
   these slots, exactly as for one build (token budgets and packing included).

Builds must agree on the model family, the tokenizer and ``train_on``. Sample
ids of a mix are positions in the builds' concatenation (build 0 first).
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardkit.errors import ConfigError
from shardkit.load.plan import EpochPlan, Level, Shuffle, batch_samples, check_epoch, epoch_order, make_plan
from shardkit.load.source import BuildSource
from shardkit.load.stream import ShardStream
from shardkit.shards import Manifest, Sample
from shardkit.shards.index import SampleIndex
from shardkit.shards.manifest import BuildInfo, FamilyInfo
from shardkit.storage import open_fs, resolved

logger = logging.getLogger(__name__)

MIX_KEY = 0x6D6978  # separates the mix's random streams from a single build's
#: memory the plan of an epoch takes per slot at most (measured: about 300 bytes with one sample a batch)
PLAN_BYTES_PER_SLOT = 320

#: what must agree between the builds of a mix, by name: the manifest's build info field
COMPATIBLE: dict[str, Callable[[BuildInfo], Any]] = {
    "model family": lambda info: info.family,
    "tokenizer": lambda info: info.tokenizer_fingerprint,
    "train_on": lambda info: info.train_on,
}


def check_compatible(
    manifests: Sequence[Manifest], names: Sequence[str], keys: Sequence[str] = tuple(COMPATIBLE)
) -> None:
    """:class:`ConfigError` naming the first difference in ``keys`` between the first build and another."""
    for manifest, name in zip(manifests[1:], names[1:], strict=True):
        for key in keys:
            mine, theirs = COMPATIBLE[key](manifests[0].config), COMPATIBLE[key](manifest.config)
            if mine != theirs:
                raise ConfigError(
                    f"{name} does not match {names[0]}: its {key} differs ({_short(theirs)} vs {_short(mine)})"
                )


def max_epoch_size() -> int:
    """The most slots the plan of an epoch can hold in this machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // PLAN_BYTES_PER_SLOT


def check_distinct(locations: Sequence[str], manifests: Sequence[Manifest]) -> None:
    """:class:`ConfigError` naming two of ``locations`` that are one build: the same folder however spelled
    (``A/``, ``A/.``, a link to ``A``), or copies of one build (the same manifest sha256)."""
    seen: dict[str, str] = {}
    for location, manifest in zip(locations, manifests, strict=True):
        for key, why in (
            (resolved(location), "the same folder"),
            (manifest.sha256, "copies of one build (the same manifest)"),
        ):
            if key in seen:
                raise ConfigError(
                    f"{seen[key]} and {location} are {why}: every sample would be read twice an epoch; give the "
                    "build once (with a larger weight to read it more)"
                )
            seen[key] = location


def _short(value: Any) -> str:
    return value.name if isinstance(value, FamilyInfo) else str(value)


def normalised(weights: Sequence[float]) -> np.ndarray:
    """``weights`` scaled by a power of two to a largest weight in [0.5, 1): their sum cannot overflow, and the shares
    computed from them are exactly those of the weights as given (scaling by a power of two loses no digit)."""
    w = np.asarray(weights, dtype=np.float64)
    return np.ldexp(w, -np.frexp(w.max())[1])


def share_counts(weights: Sequence[float], total: int) -> list[int]:
    """``total`` slots shared by weight with the largest remainder rule (module rule, step 1)."""
    w = normalised(weights)
    quotas = w * total / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    left = total - int(counts.sum())
    order = np.lexsort((np.arange(len(w)), -(quotas - counts)))  # largest remainder first, then build number
    counts[order[:left]] += 1
    return counts.tolist()


class MixSource:
    """Samples of several builds by mix id (position in the builds' concatenation)."""

    def __init__(self, locations: Sequence[str], *, verify: bool = False, checksums: bool = True):
        self.locations = list(locations)
        self.sources = [BuildSource(location, verify=verify, checksums=checksums) for location in locations]
        check_distinct(self.locations, [s.manifest for s in self.sources])
        check_compatible([s.manifest for s in self.sources], self.locations)
        for location, source in zip(locations, self.sources, strict=True):
            if not len(source):
                raise ConfigError(f"{location} has no samples: it cannot take a share of the mix")
        # the collator's settings, the same in every build (family and tokenizer agree); a build with videos gives
        # its video settings (the <|video_pad|> id, Qwen2.5-VL's position step) to the samples of all
        manifests = [s.manifest for s in self.sources]
        self.manifest = next((m for m in manifests if m.num_videos), manifests[0])
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        shard_offsets = np.cumsum([0] + [len(s.shard_sizes) for s in self.sources])
        indexes = [s.index for s in self.sources]
        self.index = SampleIndex(
            shard=np.concatenate([i.shard + o for i, o in zip(indexes, shard_offsets, strict=False)]),
            offset=np.concatenate([i.offset for i in indexes]),
            size=np.concatenate([i.size for i in indexes]),
            num_tokens=np.concatenate([i.num_tokens for i in indexes]),
        )

    @property
    def shard_sizes(self) -> list[int]:
        return [n for s in self.sources for n in s.shard_sizes]

    @property
    def sizes(self) -> list[int]:
        """Samples per build."""
        return [len(s) for s in self.sources]

    @property
    def num_grounded(self) -> int:
        """Grounding boxes and points in all the builds of the mix."""
        return sum(s.num_grounded for s in self.sources)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def build_of(self, ids: np.ndarray) -> np.ndarray:
        """The build number of each mix id."""
        return np.searchsorted(self.offsets, ids, side="right") - 1

    def get(self, sample_id: int) -> Sample:
        """The sample with this mix id."""
        build = int(self.build_of(np.asarray([sample_id]))[0])
        return self.sources[build].get(sample_id - int(self.offsets[build]))

    def close(self) -> None:
        for source in self.sources:
            source.close()


class MixStream(ShardStream):
    """Batches of one rank over several builds mixed by ``weights`` (module rule).

    ``weights`` default to the builds' sizes (each build read once an epoch);
    ``epoch_size`` (slots an epoch) defaults to the sum of the sizes. Other
    options are :class:`ShardStream`'s. ``source_counts`` counts the samples of
    each build this rank has consumed since the stream was made.
    """

    source: MixSource

    def __init__(
        self,
        locations: Sequence[str],
        *,
        weights: Sequence[float] | None = None,
        epoch_size: int | None = None,
        **options: Any,
    ):
        super().__init__(list(locations), **options)
        sizes = self.source.sizes
        weights = list(sizes if weights is None else weights)
        if len(weights) != len(sizes):
            raise ConfigError(f"{len(weights)} weights for {len(sizes)} builds")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ConfigError(f"weights must be positive numbers, got {weights}")
        if epoch_size is not None and epoch_size < 1:
            raise ConfigError(f"epoch_size must be positive, got {epoch_size}")
        self.weights = [float(w) for w in weights]
        self.epoch_size = epoch_size or sum(sizes)
        if self.epoch_size > (most := max_epoch_size()):
            raise ConfigError(
                f"epoch_size {self.epoch_size} is more than the plan of an epoch can hold in this machine's memory "
                f"(about {PLAN_BYTES_PER_SLOT} bytes a sample): at most {most}"
            )
        self.counts = share_counts(self.weights, self.epoch_size)
        scaled = normalised(self.weights)
        self.shares = (scaled / scaled.sum()).tolist()  # each build's share of the weights
        for location, share, count in zip(self.source.locations, self.shares, self.counts, strict=True):
            if not count:
                logger.warning(
                    "%s gets no sample in an epoch of %d (its share of the weights is %.3g): raise its weight or "
                    "the epoch size", location, self.epoch_size, share,
                )  # fmt: skip
        self.source_counts = np.zeros(len(sizes), dtype=np.int64)
        self._slots: tuple[int, np.ndarray, np.ndarray] | None = None

    def _open_source(self, location: Any, verify: bool, checksums: bool) -> MixSource:
        return MixSource(location, verify=verify, checksums=checksums)

    @property
    def settings(self) -> dict[str, Any]:
        mix = {"builds": self.source.sizes, "weights": self.weights, "epoch_size": self.epoch_size}
        return {**super().settings, "mix": mix}

    # -- the epoch's slots (module rule, steps 1 to 3) ----------------------------------------

    def epoch_slots(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(order, ids)``: the epoch's slots in reading order, and the mix id each slot reads."""
        check_epoch(epoch)
        if self._slots is None or self._slots[0] != epoch:
            ids = np.concatenate([self._build_run(b, epoch) for b in range(len(self.counts))])
            self._slots = (epoch, self._interleave(epoch), ids)
        return self._slots[1], self._slots[2]

    def _build_run(self, build: int, epoch: int) -> np.ndarray:
        """Mix ids of build ``build``'s positions ``[epoch * c_b, (epoch + 1) * c_b)`` (step 2)."""
        count, size = self.counts[build], self.source.sizes[build]
        if not count:
            return np.zeros(0, dtype=np.int64)
        start = epoch * count
        first, last = start // size, (start + count - 1) // size
        seed = int(np.random.default_rng([MIX_KEY, self.shuffle.seed, build]).integers(2**62))
        shuffle = Shuffle(self.shuffle.enabled, seed, self.shuffle.window)
        sizes = self.source.sources[build].shard_sizes
        run = np.concatenate([epoch_order(sizes, shuffle, p) for p in range(first, last + 1)])
        return run[start - first * size : start - first * size + count] + int(self.source.offsets[build])

    def _interleave(self, epoch: int) -> np.ndarray:
        """Slots (build 0's first) in reading order: by ``(k + u) / c_b`` (step 3)."""
        counts = np.asarray(self.counts)
        builds = np.repeat(np.arange(len(counts)), counts)
        k = np.arange(len(builds)) - np.repeat(np.cumsum(counts) - counts, counts)
        if self.shuffle.enabled:
            u = np.random.default_rng([MIX_KEY, self.shuffle.seed, epoch]).random(len(builds))
        else:
            u = np.full(len(builds), 0.5)
        return np.lexsort((builds, (k + u) / counts[builds]))

    def _make_plan(self, epoch: int, levels: list[Level], rank: int | None = None) -> EpochPlan:
        order, ids = self.epoch_slots(epoch)
        lengths = self._lengths()
        plan = make_plan(
            [],
            None if lengths is None else lengths[ids],
            epoch=epoch,
            levels=levels,
            rank=self.rank if rank is None else rank,
            shuffle=self.shuffle,
            batching=self.batching,
            order=order,
        )
        sequence = [[ids[s] for s in b] if isinstance(b, list) else ids[b] for b in plan.sequence]
        return replace(plan, sequence=sequence)

    def advance(self, batches: int = 1, *, skipped: Mapping[str, int] | None = None) -> None:
        plan = self.plan()
        start = self._levels[-1].batches
        taken = [batch_samples(b) for b in plan.sequence[start : start + batches]]
        super().advance(batches, skipped=skipped)
        if taken:
            builds = self.source.build_of(np.concatenate(taken))
            self.source_counts += np.bincount(builds, minlength=len(self.counts))

    def epoch_shares(self, epoch: int) -> list[dict[str, Any]]:
        """Per build, what a whole ``epoch`` on this stream's topology reads: samples, distinct ones, share."""
        ids = np.concatenate([batch_samples(b) for b in self.whole_epoch(epoch).sequence] or [np.zeros(0, int)])
        builds = self.source.build_of(ids)
        rows = []
        for b, location in enumerate(self.source.locations):
            mine = ids[builds == b]
            rows.append(
                {
                    "build": location,
                    "samples": self.source.sizes[b],
                    "weight": self.weights[b],
                    "target_share": self.shares[b],
                    "slots": self.counts[b],
                    "read": len(mine),
                    "distinct": len(np.unique(mine)),
                    "share": len(mine) / len(ids) if len(ids) else 0.0,
                }
            )
        return rows


# -- what the trainers take: one build, several with weights, or a mix file ----------------------


class MixEntry(BaseModel):
    """One build of a mix file."""

    model_config = ConfigDict(extra="forbid")
    path: str
    weight: float = Field(gt=0)


class MixFile(BaseModel):
    """A mix file: ``builds`` (``path``, ``weight``) and an optional ``epoch_size``."""

    model_config = ConfigDict(extra="forbid")
    builds: list[MixEntry] = Field(min_length=1)
    epoch_size: int | None = Field(None, ge=1)


def read_mix_file(location: str) -> MixFile:
    """A mix file (JSON, or YAML by its ``.yaml``/``.yml`` suffix); relative paths are from its folder."""
    fs, path = open_fs(location)
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode()
    except (FileNotFoundError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read mix file {location}: {exc}") from None
    try:
        data = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
        mix = MixFile.model_validate(data)
    except (ValueError, yaml.YAMLError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(exc).splitlines()[0]
        raise ConfigError(f"mix file {location} is not valid: {where}") from None
    folder = posixpath.dirname(location)
    for entry in mix.builds:
        if "://" not in entry.path and not posixpath.isabs(entry.path):
            entry.path = posixpath.join(folder, entry.path) if folder else entry.path
    return mix


def open_stream(
    data: Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    mix_file: str | None = None,
    epoch_size: int | None = None,
    **options: Any,
) -> ShardStream:
    """The stream a trainer reads: one build, several (``weights`` default to their sizes), or a mix file's."""
    data = list(data)
    if mix_file is not None:
        if data or weights:
            raise ConfigError("give builds either with --data (and --weights) or in a mix file, not both")
        mix = read_mix_file(mix_file)
        data, weights = [e.path for e in mix.builds], [e.weight for e in mix.builds]
        epoch_size = epoch_size or mix.epoch_size
    if not data:
        raise ConfigError("no training data: give --data or a mix file")
    if weights is not None and len(weights) != len(data):
        raise ConfigError(f"{len(weights)} weights for {len(data)} builds")
    if len(data) == 1 and epoch_size is None:
        return ShardStream(data[0], **options)
    return MixStream(data, weights=weights, epoch_size=epoch_size, **options)
