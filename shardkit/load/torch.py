"""A DataLoader with exact resume: the collator (:mod:`shardkit.load.batch`) run in worker processes over a
:class:`~shardkit.load.stream.ShardStream`, the stream's resume state kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from shardkit.load.batch import Collator, EmbeddingCollator
from shardkit.load.embeddings import EmbeddedSource
from shardkit.load.stream import ShardStream, StreamBatches


class _ReaderDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its share of the rank's batches, collated."""

    def __init__(self, stream: ShardStream, collate: Any):
        self.stream = stream
        self.collate = collate

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for batch in self.stream.batches(worker=worker, workers=workers):
            yield self.collate(batch.samples), batch.skipped


def _default_collate(stream: ShardStream) -> Collator:
    """The build's collator; for samples with cached image embeddings, the one that passes them instead of pixels."""
    embedded = isinstance(stream.source, EmbeddedSource)
    return (EmbeddingCollator if embedded else Collator).for_build(stream.source.manifest)


def _keep(batch: Any) -> Any:
    return batch


class TorchLoader(StreamBatches):
    """Collated batches of one rank from ``num_workers`` DataLoader processes, with exact resume.

    Iterating yields the rest of the current epoch; each batch handed out
    counts as consumed, so :meth:`state_dict` taken after a training step
    resumes with the next batch. ``collate`` defaults to the build's
    :class:`~shardkit.load.batch.Collator` (:class:`~shardkit.load.batch.EmbeddingCollator`
    over an :class:`~shardkit.load.embeddings.EmbeddedSource`); a ``collate`` with a
    ``set_epoch`` method is told the epoch of the batches it is given (for augmentation).
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        collate: Any = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        self.stream = stream
        self.collate = collate or _default_collate(stream)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor

    def __iter__(self) -> Iterator[Any]:
        self.stream.plan()
        if hasattr(self.collate, "set_epoch"):
            self.collate.set_epoch(self.stream.epoch)  # before worker processes take their copy
        if self.num_workers == 0:
            for batch in self.stream.batches():
                out = self.collate(batch.samples)
                self.stream.advance(skipped=batch.skipped)
                yield out
            return
        loader = torch.utils.data.DataLoader(
            _ReaderDataset(self.stream, self.collate),
            batch_size=None,
            collate_fn=_keep,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )
        for out, skipped in loader:
            self.stream.advance(skipped=skipped)
            yield out
