"""``shardkit embed``: a model's vision tower run once over every image of a build, its output cached.

With a frozen vision tower, its output for an image is the same at every step
of every epoch and every run; :func:`embed` computes it once (with the merger,
exactly what the language model receives at the image's ``<|image_pad|>``
tokens) and writes it as shards beside or apart from the build (format:
:mod:`shardkit.shards.embeddings`). One task per build shard; finished shards
are kept when a killed run is started again, and the manifest is written last.
Under ``torchrun`` each rank embeds its share of the shards. On CUDA the tower
runs in bf16 (``dtype="bfloat16"``), on CPU in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from shardkit import __version__
from shardkit.embed import EmbedConfig
from shardkit.errors import ShardError
from shardkit.load.batch import Collator
from shardkit.load.embeddings import refuse_videos
from shardkit.load.source import BuildSource
from shardkit.model import (
    check_fits_build,
    leave_distributed,
    load_model,
    setup_distributed,
    vision_fingerprint,
    vision_tower,
)
from shardkit.shards import Sample
from shardkit.shards.embeddings import (
    EMBEDDINGS_NAME,
    BuildRef,
    EmbeddingManifest,
    EmbeddingShardWriter,
    EmbedTaskResult,
    VisionTower,
    read_embedding_manifest,
)
from shardkit.shards.folder import check_tasks, claim, cleanup, save_result, task_results
from shardkit.shards.index import INDEX_NAME, IndexWriter
from shardkit.shards.manifest import BuildInfo, IndexFile, ShardEntry
from shardkit.storage import atomic_write, join, open_fs

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def image_features(visual: torch.nn.Module, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[dict[str, Any]]:
    """Per image, its named output tensors: ``embeds`` (tokens, hidden), and ``deepstack.K`` where the tower has
    deepstack mergers (Qwen3-VL)."""
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid)
    sizes = (grid.prod(-1) // visual.spatial_merge_size**2).tolist()
    named = {"embeds": out.pooler_output}
    for k, tensor in enumerate(getattr(out, "deepstack_features", None) or []):
        named[f"deepstack.{k}"] = tensor
    parts = {name: tensor.split(sizes) for name, tensor in named.items()}
    return [{name: split[i] for name, split in parts.items()} for i in range(len(sizes))]


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _load_vision(
    path: str, build_config: BuildInfo, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, VisionTower]:
    """The model's vision tower on ``device`` in ``dtype``, and its description (fingerprint of float32 weights)."""
    model = load_model(path)
    check_fits_build(model, build_config)
    hidden = model.config.vision_config
    info = VisionTower(
        model=path,
        model_type=model.config.model_type,
        fingerprint=vision_fingerprint(model),
        hidden_size=getattr(hidden, "out_hidden_size", None) or hidden.hidden_size,
    )
    visual = vision_tower(model).to(device, dtype).eval()
    return visual, info


def _groups(samples: Iterator[Sample], images: int) -> Iterator[list[Sample]]:
    """Consecutive samples, grouped until a group holds at least ``images`` images."""
    group: list[Sample] = []
    for sample in samples:
        group.append(sample)
        if sum(len(s.images) for s in group) >= images:
            yield group
            group = []
    if group:
        yield group


def _encode(sample: Sample, features: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> bytes:
    """One sample's images' tensors as a safetensors blob (``"{image}.{name}"``)."""
    from safetensors.torch import save

    tensors = {}
    for i, (info, named) in enumerate(zip(sample.info["images"], features, strict=True)):
        if named["embeds"].shape[0] != info["num_tokens"]:
            raise ShardError(
                f"sample {sample.key} image {i}: the vision tower gave {named['embeds'].shape[0]} "
                f"embeddings for {info['num_tokens']} image tokens: does the model fit the build?"
            )
        for name, tensor in named.items():
            tensors[f"{i}.{name}"] = tensor.detach().to("cpu", dtype).contiguous()
    return save(tensors)


def _embed_task(
    task: int, source: BuildSource, visual: torch.nn.Module, config: EmbedConfig, bar: Any
) -> EmbedTaskResult:
    """Embed the samples of build shard ``task`` into ``shard-TTTTTT.tar``; the task's result record."""
    fs, out = open_fs(config.out)
    collate = Collator.for_build(source.manifest, pixels="uint8")
    device = next(visual.parameters()).device
    start = sum(source.shard_sizes[:task])
    samples = (source.get(i) for i in range(start, start + source.shard_sizes[task]))
    path = f"shard-{task:06d}.tar"
    names: set[str] = set()
    with EmbeddingShardWriter(fs, join(out, path)) as writer, torch.inference_mode():
        for group in _groups(samples, config.batch_images):
            per_sample: list[list[dict[str, torch.Tensor]]] = [[] for _ in group]
            if any(s.images for s in group):
                batch = collate.to_device(collate(group), device, visual.dtype)
                features = iter(image_features(visual, batch["pixel_values"], batch["image_grid_thw"]))
                per_sample = [[next(features) for _ in s.images] for s in group]
            for sample, features_of_sample in zip(group, per_sample, strict=True):
                tokens = sum(image["num_tokens"] for image in sample.info["images"])
                writer.write(sample.key, _encode(sample, features_of_sample, DTYPES[config.dtype]), tokens)
                names.update(name for named in features_of_sample for name in named)
                bar.update(1)
        shard = writer.close()
    return EmbedTaskResult(index=task, shards=[shard], tensors=sorted(names))


def embed(config: EmbedConfig, *, progress: bool | None = None) -> EmbeddingManifest:
    """Compute and write the image embeddings of ``config.build``; the manifest (resumes an interrupted pass)."""
    from tqdm import tqdm

    rank, world, device = setup_distributed("gloo")  # the ranks only wait for each other
    source = BuildSource(config.build)
    refuse_videos(source)
    compute = DTYPES[config.dtype] if device.type == "cuda" else torch.float32
    visual, tower = _load_vision(config.model, source.manifest.config, device, compute)
    identity = {
        "kind": "image_embeddings",
        "build": source.manifest.sha256,
        "vision": tower.fingerprint,
        "dtype": config.dtype,
    }
    fs, out = open_fs(config.out)
    if not config.overwrite and fs.exists(join(out, EMBEDDINGS_NAME)):
        done = read_embedding_manifest(config.out)
        if (done.build.manifest_sha256, done.vision.fingerprint, done.dtype) == (
            identity["build"],
            identity["vision"],
            config.dtype,
        ):
            logger.info("%s already holds these embeddings", config.out)
            leave_distributed()
            return done
    if rank == 0:
        claim(fs, out, identity, overwrite=config.overwrite, manifest_name=EMBEDDINGS_NAME)
    _barrier()
    tasks = len(source.manifest.shards)
    # a task's inputs are the build's, fixed by its identity
    finished, _ = check_tasks(fs, out, lambda result: True, EmbedTaskResult)
    mine = [t for t in range(tasks) if t % world == rank and t not in finished]
    samples = sum(source.shard_sizes[t] for t in mine)
    with tqdm(
        total=samples,
        unit="sample",
        desc=f"embed rank {rank}" if world > 1 else "embed",
        disable=None if progress is None else not progress,
    ) as bar:
        for task in mine:
            save_result(fs, out, _embed_task(task, source, visual, config, bar))
    _barrier()
    if rank == 0:
        manifest = _assemble(fs, out, source, tower, config)
    _barrier()
    leave_distributed()
    return manifest if rank == 0 else read_embedding_manifest(config.out)


def _assemble(fs: Any, out: str, source: BuildSource, tower: VisionTower, config: EmbedConfig) -> EmbeddingManifest:
    """Write the index and, last, the manifest, from every task's result."""
    entries: list[ShardEntry] = []
    names: set[str] = set()
    with atomic_write(fs, join(out, INDEX_NAME)) as index_file:
        index = IndexWriter(index_file)
        for result in task_results(fs, out, len(source.manifest.shards), EmbedTaskResult):
            shard = result.shards[0]
            names.update(result.tensors)
            index.add(len(entries), shard.locations, shard.tokens)
            entries.append(shard.entry())
        index_entry = index.close()
    manifest = EmbeddingManifest(
        build=BuildRef(
            manifest_sha256=source.manifest.sha256,
            num_samples=source.manifest.num_samples,
            num_images=source.manifest.num_images,
        ),
        vision=tower,
        dtype=config.dtype,
        tensors=sorted(names),
        num_samples=sum(e.num_samples for e in entries),
        num_images=source.manifest.num_images,
        num_image_tokens=sum(e.num_tokens for e in entries),
        shards=entries,
        index=IndexFile(**index_entry),
        created_by=f"shardkit {__version__}",
    )
    manifest.write(fs, out)
    cleanup(fs, out)
    return manifest
