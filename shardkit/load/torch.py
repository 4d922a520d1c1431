"""A DataLoader with exact resume: the collator (:mod:`shardkit.load.batch`) run in worker processes over a
:class:`~shardkit.load.stream.ShardStream`, the stream's resume state kept.

Pixels are finished where the batch goes. Worker processes pass each batch's images as uint8 patches (an eighth
of float32's bytes through shared memory); the main process makes ``pixel_values`` of them on the batch's device
(:meth:`~shardkit.load.batch.Collator.to_device`): on the GPU when the loader is given ``device="cuda"``, else on
the CPU. With no worker process, a float32 collator makes ``pixel_values`` itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

from shardkit.load.batch import Collator, EmbeddingCollator, moved
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

    ``device`` is where the batches go: None keeps them on the CPU; a device (``"cuda"``, ``"cuda:1"``) has each
    batch moved there by the collator's ``to_device``, which turns the uint8 patches the workers pass into float32
    ``pixel_values`` on that device, so the CPU never makes them. Either way a pixel collator's float32 batches
    reach the caller with ``pixel_values`` (a collator made with ``pixels="uint8"`` and no device: with
    ``pixel_patches``, as it makes them).
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        collate: Any = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        device: str | torch.device | None = None,
    ):
        self.stream = stream
        self.collate = collate or _default_collate(stream)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.device = None if device is None else torch.device(device)

    def _split_collate(self) -> tuple[Any, Any]:
        """What collates a batch where the samples are read, and what finishes it here (None: nothing to finish).

        The pixels of a :class:`Collator` are made on the batch's device: by its ``to_device`` here (uint8 patches
        from the workers, or from this process with a device), else by the collator itself (no worker, the CPU).
        """
        collate = self.collate
        pixel_collator = isinstance(collate, Collator) and not isinstance(collate, EmbeddingCollator)
        if self.device is not None:
            if not pixel_collator:
                return collate, lambda batch: moved(batch, self.device)
            return _as_uint8(collate), lambda batch: collate.to_device(batch, self.device)
        if pixel_collator and collate.pixels == "float32" and self.num_workers > 0:
            return _as_uint8(collate), lambda batch: collate.to_device(batch, "cpu")
        return collate, None

    def __iter__(self) -> Iterator[Any]:
        self.stream.plan()
        if hasattr(self.collate, "set_epoch"):
            self.collate.set_epoch(self.stream.epoch)  # before worker processes take their copy
        collate, finish = self._split_collate()
        if self.num_workers == 0:
            for batch in self.stream.batches():
                out = collate(batch.samples)
                self.stream.advance(skipped=batch.skipped)
                yield out if finish is None else finish(out)
            return
        loader = torch.utils.data.DataLoader(
            _ReaderDataset(self.stream, collate),
            batch_size=None,
            collate_fn=_keep,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )
        for out, skipped in loader:
            self.stream.advance(skipped=skipped)
            yield out if finish is None else finish(out)


def _as_uint8(collate: Collator) -> Collator:
    """``collate`` (its epoch too) making uint8 ``pixel_patches``."""
    if collate.pixels == "uint8":
        return collate
    out = copy.copy(collate)
    out.pixels = "uint8"
    return out
