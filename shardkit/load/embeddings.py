"""Batches without pixels: cached image embeddings (from ``shardkit embed``) in place of the images.

``ShardStream(build, image_embeddings=DIR, ...)`` reads each sample's cached
tensors with it (:class:`EmbeddingSource`, checked to belong to that build);
:class:`EmbeddingCollator` makes the batch: ``input_ids``, ``attention_mask``
(plain and token-budget batches), ``labels``, ``image_embeds`` (every image's
embeddings in token order) and the M-RoPE ``position_ids`` the model would
compute from the pixels (``(3, rows, length)``, zero on padding, as
``get_rope_index`` gives them; packed batches keep their ``(4, rows, length)``
positions and flash-attention boundaries). :meth:`EmbeddingCollator.model_inputs`
turns such a batch into the model's keyword arguments: ``inputs_embeds`` (the
token embeddings with the cached image embeddings scattered at the
``<|image_pad|>`` positions) and ``position_ids``, so the vision tower is not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from shardkit.errors import ConfigError, ShardCorruptError, ShardError
from shardkit.load.source import BuildSource, ShardFiles
from shardkit.load.torch import Qwen2VLCollator, mrope_positions
from shardkit.shards import Sample
from shardkit.shards.base import checksum_of
from shardkit.shards.embeddings import (
    EmbeddingManifest,
    read_blob,
    read_embedding_manifest,
    verify_embeddings,
)
from shardkit.shards.files import reading_error
from shardkit.shards.index import SampleIndex, load_index
from shardkit.storage import join, open_fs


@dataclass
class EmbeddedSample(Sample):
    """A sample with its images' cached tensors (a safetensors blob, see :mod:`shardkit.shards.embeddings`)."""

    features: bytes = b""


class EmbeddingSource:
    """The cached image tensors of the samples of ``build``, by sample id; refuses a cache made from another build."""

    def __init__(self, location: str, build: BuildSource, *, verify: bool = False):
        self.location = location
        self.manifest: EmbeddingManifest = read_embedding_manifest(location)
        if self.manifest.build.manifest_sha256 != build.manifest.sha256:
            raise ConfigError(
                f"the image embeddings in {location} were made from another build than {build.location} "
                "(or from an earlier version of it): run shardkit embed on this build"
            )
        fs, self.folder = open_fs(location)
        path = join(self.folder, self.manifest.index.path)
        self.index: SampleIndex = load_index(fs, path, self.manifest.index)
        if len(self.index) != self.manifest.num_samples:
            raise ShardError(f"{path} has {len(self.index)} rows, the manifest {self.manifest.num_samples} samples")
        self.files = ShardFiles(location, [join(self.folder, s.path) for s in self.manifest.shards])
        if verify and (problems := verify_embeddings(location)):
            raise ShardError("; ".join(problems))

    def attach(self, sample_id: int, sample: Sample) -> EmbeddedSample:
        """``sample`` (id ``sample_id``) with its cached tensors, and without its image bytes."""
        number = int(self.index.shard[sample_id])
        offset, size = int(self.index.offset[sample_id]), int(self.index.size[sample_id])
        path = self.files.paths[number]
        try:
            key, blob = read_blob(self.files.get(number), offset, size)
        except Exception as exc:  # a ShardError (from opening it) as it is; the file, the network; else the bytes
            raise reading_error(exc, f"embeddings shard {path} (sample {sample_id} at {offset})") or ShardCorruptError(
                f"embeddings shard {path} is truncated or corrupt (sample {sample_id}, key {sample.key!r}, "
                f"at {offset}): {exc}"
            ) from None
        if key != sample.key:
            raise ShardCorruptError(
                f"embeddings shard {path}: sample {sample_id} holds key {key!r}, the build's sample is {sample.key!r}"
            )
        if self.index.checksum is not None and checksum_of(blob) != int(self.index.checksum[sample_id]):
            raise ShardCorruptError(
                f"embeddings shard {path}: sample {sample_id} (key {key!r}) does not match its checksum"
            )
        values = {f.name: getattr(sample, f.name) for f in fields(Sample)}
        return EmbeddedSample(**{**values, "images": []}, features=blob)


class EmbeddingCollator(Qwen2VLCollator):
    """Samples with cached image embeddings -> a batch without pixels (see the module doc)."""

    def __call__(self, samples: Sequence[Sample] | Sequence[Sequence[Sample]]) -> dict[str, Any]:
        batch = super().__call__(samples)
        batch.pop("mm_token_type_ids", None)
        count = batch["image_embeds"].shape[0] if "image_embeds" in batch else 0
        if (tokens := int((batch["input_ids"] == self.image_token_id).sum())) != count:  # on the CPU, in the worker
            raise ShardError(f"the batch has {tokens} image tokens and {count} cached image embeddings")
        if "attention_mask" in batch:
            batch["position_ids"] = self._positions(samples, batch["input_ids"].shape[1])  # type: ignore[arg-type]
        return batch

    def _positions(self, samples: Sequence[Sample], length: int) -> torch.Tensor:
        """``(3, rows, length)`` M-RoPE positions of right-padded rows, zero on padding (as the model computes)."""
        out = np.zeros((3, len(samples), length), dtype=np.int64)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            out[:, row, :n] = mrope_positions(n, sample.info["images"], self.merge_size)
        return torch.from_numpy(out)

    def _add_images(self, batch: dict[str, Any], samples: Sequence[Sample]) -> dict[str, Any]:
        """Add every image's cached embeddings, in token order, as ``image_embeds``."""
        from safetensors.torch import load

        embeds = []
        for sample in samples:
            if not isinstance(sample, EmbeddedSample):
                raise ConfigError("EmbeddingCollator needs a ShardStream opened with image_embeddings=DIR")
            tensors = load(sample.features)
            for i, image in enumerate(sample.info["images"]):
                tensor = tensors.get(f"{i}.embeds")
                if tensor is None or tensor.shape[0] != image["num_tokens"]:
                    found = "none" if tensor is None else f"{tensor.shape[0]} tokens"
                    raise ShardError(f"sample {sample.key} image {i}: cached embeddings ({found}) do not match its "
                                     f"{image['num_tokens']} image tokens")  # fmt: skip
                embeds.append(tensor)
        if embeds:
            batch["image_embeds"] = torch.cat(embeds)
        return batch

    def model_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch (on the model's device) -> the model's keyword arguments: ``inputs_embeds`` with the cached image
        embeddings at the image pads, instead of ``input_ids``."""
        out = dict(batch)
        input_ids = out.pop("input_ids")
        image_embeds = out.pop("image_embeds", None)
        embeds = model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id  # as many as image_embeds' rows: checked when collated
        if image_embeds is not None:
            image_embeds = image_embeds.to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), image_embeds)
        out["inputs_embeds"] = embeds
        return out
