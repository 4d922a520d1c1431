"""Trainers fed by the streaming loaders: local torch (``local``) and Tinker (``tinker``), and their options.

The option sets live here, apart from the code that runs them, so that reading
them needs neither torch nor the Tinker SDK (the command line, ``--help``
included, is made from them).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from shardkit.errors import ConfigError
from shardkit.options import Options
from shardkit.words import counted

# What a run writes in --output (either trainer): the only files --overwrite deletes.
RUN_FILES = (
    "train_config.json",
    "metrics.jsonl",
    "loss.png",
    "tinker_state.json",
    "checkpoints",
    "final",
    "final.partial",
)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` after ``step``: a run resumed from that step writes them again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def claim_output(output: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Make sure a run may write in ``output``: one that holds an earlier run is refused unless the run resumes it, or
    ``overwrite`` asks to start over (then that run's own files, :data:`RUN_FILES`, are deleted; nothing else)."""
    output = Path(output)
    found = [name for name in RUN_FILES if (output / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(
            f"--output {output} holds a run ({', '.join(found)}): pass --resume to continue it, or --overwrite to "
            "start over (deleting its checkpoints, metrics and final model)"
        )
    for name in found:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class DataOptions(Options):
    """What both trainers read: one build, several with ``weights`` or a ``mix`` file; an evaluation build."""

    data: list[str] = Field(
        [],
        description="a shardkit build (folder or fsspec URL); repeat it to train on a mix of builds (see --weights)",
    )
    weights: list[float] | None = Field(
        None, description="one weight per build, e.g. 0.6,0.4 (default: the builds' sizes, each read once an epoch)"
    )
    mix: str | None = Field(
        None, description="a mix file (JSON or YAML): {builds: [{path, weight}, ...], epoch_size}, paths relative to it"
    )
    epoch_size: int | None = Field(
        None, ge=1, description="samples per epoch of a mix (default: the sum of the builds' sizes)"
    )
    eval_data: str | None = Field(
        None,
        description="a build to evaluate on (e.g. the val/ half of a --val-fraction build): eval_loss in metrics.jsonl",
    )
    eval_every: int | None = Field(
        None, ge=1, description="evaluate every N optimizer steps (default: only at the end)"
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def open_stream(self, **options: Any) -> Any:
        """The training stream (:func:`shardkit.load.mix.open_stream`) with these builds and ``options``."""
        from shardkit.load.mix import open_stream

        return open_stream(self.data, weights=self.weights, mix_file=self.mix, epoch_size=self.epoch_size, **options)


class TrainOptions(DataOptions):
    """What both trainers take besides the data; defaults that differ between them are resolved by each."""

    output: str = Field(description="logs, checkpoints and the final model")
    lora_rank: int | None = Field(
        None, ge=1, description="train a LoRA adapter of this rank (torch: needs peft; default: torch none, tinker 32)"
    )
    lr: float | None = Field(
        None, gt=0, description="peak learning rate (default: 1e-5 full fine-tune, 1e-4 LoRA and Tinker)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    epochs: int | None = Field(None, ge=1, description="epochs to train (default: 1)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train, instead of epochs")
    batch_size: int | None = Field(None, ge=1, description="samples per batch (default: 1 torch, 32 tinker)")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="fraction of steps of linear warmup")
    save_every: int = Field(500, ge=1, description="checkpoint every N optimizer steps, and at the end")
    seed: int = Field(0, description="shuffling and initialisation seed")
    resume: bool = Field(False, description="continue from the latest checkpoint in --output")
    overwrite: bool = Field(
        False,
        description="start over in an --output that holds a run: its checkpoints, metrics and final model are deleted "
        "(without it, or --resume, such an --output is refused)",
    )

    @model_validator(mode="after")
    def _one_length(self) -> TrainOptions:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give --epochs or --max-steps, not both")
        if self.resume and self.overwrite:
            raise ValueError("give --resume or --overwrite, not both")
        return self

    @property
    def total_epochs(self) -> int | None:
        """The epochs a run trains (None when ``max_steps`` bounds it instead)."""
        return None if self.max_steps else (self.epochs or 1)

    def _default(self, **values: Any) -> None:
        """Set the fields of ``values`` that were left unset (None)."""
        for name, value in values.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)


class TrainConfig(TrainOptions):
    """Options of a local (torch) training run."""

    model: str = Field(description="torch: the model to fine-tune (local folder or Hugging Face id)")
    lora_alpha: int | None = Field(None, ge=1, description="torch: the LoRA scale alpha (default: twice the rank)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="torch: dropout on the LoRA adapter's input")
    batch_tokens: int | None = Field(
        None, ge=1, description="torch: a token budget per batch (padded), similar lengths batched together"
    )
    pack: bool = Field(
        False,
        description="torch: pack whole samples into one sequence of up to --batch-tokens tokens per batch, no padding",
    )
    grad_accum: int = Field(1, ge=1, description="torch: batches per optimizer step")
    max_grad_norm: float = Field(1.0, gt=0, description="torch: gradient clipping norm")
    gradient_checkpointing: bool = Field(False, description="torch: trade compute for activation memory")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None,
        description="torch: the attention kernel (default: transformers'; flash_attention_2 makes --pack skip padding "
        "work)",
    )
    augment: bool = Field(
        False,
        description="torch: randomly rotate (up to 10 degrees; not data with grounding boxes) and change brightness "
        "and contrast (up to 20%) of each image at load time, drawn anew each epoch; resume stays exact",
    )
    freeze_vision_tower: bool = Field(
        False, description="torch: the vision tower and its merger get no gradient (with or without --image-embeddings)"
    )
    image_embeddings: str | None = Field(
        None,
        description="torch: cached image embeddings of --data from shardkit embed (same model's vision tower): the "
        "tower is not run; needs --freeze-vision-tower (or LoRA), not --augment",
    )
    num_workers: int = Field(2, ge=0, description="torch: DataLoader worker processes per rank")
    on_error: Literal["raise", "skip"] = Field(
        "raise",
        description="torch: a sample that cannot be read (corrupt bytes, a missing shard): stop with an error "
        "naming shard and key, or skip it with a warning and count it in metrics.jsonl's skipped",
    )
    keep_checkpoints: int = Field(2, ge=1, description="torch: how many checkpoints to keep")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size is not None and self.batch_tokens is not None:
            raise ValueError("give --batch-size or --batch-tokens, not both")
        if self.pack and self.batch_tokens is None:
            raise ValueError("--pack needs --batch-tokens: the length of each packed sequence")
        if self.image_embeddings and self.augment:
            raise ValueError("--image-embeddings feeds cached embeddings of the stored images: --augment cannot apply")
        if self.image_embeddings and (len(self.data) > 1 or self.mix or self.epoch_size):
            raise ValueError("cached image embeddings (--image-embeddings) are for one build; a mix reads pixels")
        self._default(lr=1e-4 if self.lora_rank else 1e-5, batch_size=None if self.batch_tokens else 1)
        return self


class TinkerTrainConfig(TrainOptions):
    """Options of a Tinker training run (LoRA on a base model that Tinker serves)."""

    base_model: str = Field(description="tinker: the base model, e.g. Qwen/Qwen3-VL-30B-A3B-Instruct")

    @model_validator(mode="after")
    def _check(self) -> TinkerTrainConfig:
        self._default(lora_rank=32, lr=1e-4, batch_size=32)
        return self


def planned_steps(options: TrainOptions, stream: Any, grad_accum: int = 1) -> int:
    """The optimizer steps of a run, for either trainer: ``max_steps``, else ``epochs`` (default 1) times the steps of
    an epoch of ``stream`` on this rank (``grad_accum`` batches a step, the last step of an epoch perhaps fewer);
    :class:`ConfigError` when an epoch gives this rank no batch."""
    batches = stream.steps_in_epoch(0)
    if not batches:
        data = ", ".join(options.data) or options.mix
        raise ConfigError(f"{data} has too few samples for a batch per rank ({counted(stream.world_size, 'rank')})")
    return options.max_steps or math.ceil(batches / grad_accum) * options.total_epochs


class SourceCounter:
    """``source_samples`` of the metrics: samples of each build of a mix consumed so far, all ranks together."""

    def __init__(self, stream: Any, done: dict[str, int] | None = None):
        self.names: list[str] = list(getattr(stream.source, "locations", []))
        self.stream = stream
        self.total = np.array([(done or {}).get(n, 0) for n in self.names], dtype=np.int64)
        self._seen = self._local()

    def _local(self) -> np.ndarray:
        return np.array(getattr(self.stream, "source_counts", []), dtype=np.int64)

    def update(self, all_reduce: Any = None) -> dict[str, int] | None:
        """Add what this rank consumed since the last call (summed over ranks by ``all_reduce``); the totals."""
        if not self.names:
            return None
        now = self._local()
        delta, self._seen = now - self._seen, now
        self.total += delta if all_reduce is None else all_reduce(delta)
        return dict(zip(self.names, self.total.tolist(), strict=True))
