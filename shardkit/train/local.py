"""The local torch trainer: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 (dense, MoE) from shards, one process or many
(torchrun).

Full fine-tune or LoRA (peft, an optional extra), AdamW, linear warmup then
cosine decay, gradient clipping, gradient accumulation with the loss averaged
over every target token of the step (across micro-batches and ranks), bf16
autocast on CUDA, optional gradient checkpointing, optional packing (``pack``:
samples packed whole into one sequence of up to ``batch_tokens`` tokens per
micro-batch, attention kept within each sample, and Qwen3.5's linear-attention
layers run per sample: :func:`~shardkit.model.packing.prepare_packing`), optional load-time image
augmentation (``augment``: :class:`~shardkit.load.augment.Augment`'s default
strengths, seeded by ``seed``), a frozen vision tower and merger
(``freeze_vision_tower``), optionally fed by cached image embeddings
(``image_embeddings``: a folder from ``shardkit embed`` for this build and
this model's vision tower; the tower is then not run). Under ``torchrun`` it runs DDP (nccl on GPU,
gloo on CPU); only rank 0 writes logs and checkpoints.

A checkpoint holds the trainable weights, the optimizer, the scheduler, the
step and the loader's resume state; ``resume=True`` continues from the latest
one and gives the same losses as a run that was never interrupted.

Output folder::

    train_config.json   the options of the run
    metrics.jsonl       one line per optimizer step: loss, lr, grad norm, samples/s, tokens/s, skipped (samples
                        rank 0's loader dropped so far, on_error="skip") (and, for a mix, source_samples per
                        build); one line per evaluation: step, eval_loss
    loss.png            the loss curve (when matplotlib is installed)
    checkpoints/step-000100/   trainable.safetensors, optimizer.pt, scheduler.pt, state.json
    final/              the fine-tuned model (save_pretrained), or the LoRA adapter
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardkit.errors import ConfigError
from shardkit.load import BuildSource, ShardStream
from shardkit.load.augment import Augment
from shardkit.load.batch import Collator, EmbeddingCollator
from shardkit.load.embeddings import EmbeddedSource
from shardkit.load.mix import MixSource, check_compatible
from shardkit.load.torch import TorchLoader
from shardkit.model import (
    check_fits_build,
    check_fits_embeddings,
    check_token_ids,
    leave_distributed,
    load_model,
    rank_world,
    setup_distributed,
    vision_tower,
)
from shardkit.model.packing import prepare_packing
from shardkit.shards import Manifest
from shardkit.train import SourceCounter, TrainConfig, claim_output, keep_metrics_until, planned_steps
from shardkit.train.evaluate import EvalResult, combine, eval_batches, rank_share

logger = logging.getLogger(__name__)

#: the language model's linear layers LoRA adapts, never the vision tower's: attention, MLP (a MoE's shared expert;
#: its routed experts are 3-D parameters, not linear layers) and Qwen3.5's Gated DeltaNet projections
LORA_TARGETS = (
    r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    r"|in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj)$"
)


# -- distributed -------------------------------------------------------------------------


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
    return value


def _all_reduce_numpy(value: Any) -> Any:
    """An integer array summed over ranks (on the CPU with gloo, on the GPU with nccl)."""
    if not torch.distributed.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return _all_reduce_sum(torch.as_tensor(value, device=device)).cpu().numpy()


# -- evaluation --------------------------------------------------------------------------


class Evaluation:
    """An evaluation build and this rank's share of its batches (rule: :mod:`shardkit.train.evaluate`)."""

    def __init__(self, location: str, train_manifest: Manifest, batch_size: int):
        self.source = BuildSource(location)
        check_compatible([train_manifest, self.source.manifest], ["--data", location], ["model family", "tokenizer"])
        if not len(self.source):
            raise ConfigError(f"the evaluation build {location} has no samples")
        self.collator = Collator.for_build(self.source.manifest, pixels="uint8")
        self.batches = eval_batches(len(self.source), batch_size)
        self.mine = rank_share(len(self.batches), *rank_world())


@torch.no_grad()
def evaluate(model: torch.nn.Module, evaluation: Evaluation, device: torch.device, autocast: Any = None) -> EvalResult:
    """The mean loss per target token of ``model`` over the whole evaluation build, all ranks together.

    Puts ``model`` in eval mode (the caller puts it back in train mode).
    """
    model.eval()
    count = len(evaluation.batches)
    loss_sums = torch.zeros(count, dtype=torch.float64, device=device)
    tokens = torch.zeros(count, dtype=torch.int64, device=device)
    for number in evaluation.mine:
        samples = [evaluation.source.get(int(i)) for i in evaluation.batches[number]]
        inputs = evaluation.collator.to_device(evaluation.collator(samples), device)
        with autocast or nullcontext():
            out = model(**inputs, num_items_in_batch=1)  # the summed loss over the batch's target tokens
        loss_sums[number] = out.loss.double()
        tokens[number] = int((inputs["labels"][:, 1:] != -100).sum())
    loss_sums, tokens = _all_reduce_sum(loss_sums), _all_reduce_sum(tokens)  # one rank holds each entry
    return combine(loss_sums.tolist(), tokens.tolist(), len(evaluation.source))


# -- model -------------------------------------------------------------------------------


def _step_loss(model: torch.nn.Module, inputs: dict[str, Any], num_items: torch.Tensor) -> torch.Tensor:
    """Sum of the batch's token losses divided by ``num_items`` (the targets of the whole step).

    Computed here from the logits: Qwen3-VL's forward ignores ``num_items_in_batch``
    and would average over the micro-batch alone.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return ForCausalLMLoss(logits, inputs["labels"], logits.shape[-1], num_items_in_batch=num_items)


def _wrap_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--lora-rank needs peft: pip install 'shardkit[lora]'") from None
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha or 2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=LORA_TARGETS,
        bias="none",
    )
    return get_peft_model(model, lora)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in names}


# -- checkpoints -------------------------------------------------------------------------


def _checkpoints(output: Path) -> list[Path]:
    folder = output / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / "state.json").exists())


def _save_checkpoint(output: Path, step: int, model, optimizer, scheduler, loader_state, keep: int, **extra) -> None:
    from safetensors.torch import save_file

    final = output / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    state = {"step": step, "loader": loader_state, "torch_rng": torch.get_rng_state().tolist(), **extra}
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(output)[:-keep]:
        shutil.rmtree(old)


def _latest_checkpoint(output: Path, rank: int) -> Path | None:
    """The checkpoint rank 0 sees as the latest, the same on every rank (rank 0 alone writes checkpoints)."""
    choice = [str(_checkpoints(output)[-1]) if rank == 0 and _checkpoints(output) else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    path = Path(choice[0])
    if not (path / "state.json").exists():
        raise ConfigError(
            f"rank {rank} cannot read checkpoint {path}: with several nodes, --output must be shared storage"
        )
    return path


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = load_file(path / "trainable.safetensors")
    missing = set(_trainable_state(model)) - set(weights)
    if missing:
        raise ConfigError(f"{path} does not match this model ({len(missing)} trainable tensors missing)")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state


# -- the loop ----------------------------------------------------------------------------


def _windows(loader: TorchLoader, size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The rest of the loader's epoch in groups of ``size`` batches (the last may be smaller)."""
    window: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _open_data(config: TrainConfig) -> tuple[Any, Any, TorchLoader]:
    """The training stream, its collator and the loader of model-ready batches."""
    options = {
        "batch_size": None if config.batch_tokens else (config.batch_size or 1),
        "max_tokens": None if config.pack else config.batch_tokens,
        "pack_tokens": config.batch_tokens if config.pack else None,
        "seed": config.seed,
        "on_error": config.on_error,
    }
    if config.image_embeddings and config.data:  # one build: TrainConfig refuses them with a mix
        stream = ShardStream(EmbeddedSource(config.data[0], config.image_embeddings), **options)
        collator = EmbeddingCollator.for_build(stream.source.manifest)
    else:
        stream = config.open_stream(**options)
        augment = _augment(config, stream.source)
        collator = Collator.for_build(stream.source.manifest, pixels="uint8", augment=augment)
    return stream, collator, TorchLoader(stream, collate=collator, num_workers=config.num_workers)


def _augment(config: TrainConfig, source: BuildSource | MixSource) -> Augment | None:
    """``--augment``'s augmentation: :class:`Augment`'s default strengths, but no rotation for data with grounding
    boxes or points (their coordinates are written in its tokens: rotation would move the pixels under them)."""
    if not config.augment:
        return None
    if source.num_grounded:
        logger.warning(
            "--augment: the data carries %d grounding boxes or points, so its images are not rotated (only their "
            "brightness and contrast change)",
            source.num_grounded,
        )
        return Augment(seed=config.seed, rotation=0)
    return Augment(seed=config.seed)


def _prepare_model(config: TrainConfig, stream: Any) -> torch.nn.Module:
    """The model to train, checked against the build (and the cached embeddings), frozen and wrapped as asked."""
    model = load_model(config.model, config.attn_implementation)
    check_fits_build(model, stream.source.manifest.config)
    if config.pack:
        prepare_packing(model)
    if config.freeze_vision_tower:
        vision_tower(model).requires_grad_(False)
    if config.image_embeddings:
        check_fits_embeddings(model, stream.source.embeddings, config.image_embeddings)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora_rank:
        model = _wrap_lora(model, config)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
    if config.image_embeddings and any(p.requires_grad for p in vision_tower(model).parameters()):
        raise ConfigError("--image-embeddings: the vision tower would be trained; add --freeze-vision-tower")
    return model


@dataclass
class _Stepper:
    """One optimizer step over a window of ``grad_accum`` batches, taken by every rank together."""

    config: TrainConfig
    model: torch.nn.Module  # wrapped in DDP when world > 1
    collator: Any
    trainable: list[torch.nn.Parameter]  # what the optimizer updates, and the gradients clipped
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    world: int
    autocast: Any

    @property
    def inner(self) -> torch.nn.Module:
        """The model itself (not its DDP wrapper)."""
        return self.model.module if self.world > 1 else self.model

    def __call__(self, window: list[dict[str, torch.Tensor]]) -> tuple[float, float, int, int]:
        """Step on ``window``: the loss and gradient norm, and the samples and tokens, of all ranks together."""
        world, device = self.world, self.device
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        targets = _all_reduce_sum(torch.tensor(float(local_targets), device=device))
        loss_sum = torch.zeros((), device=device)
        samples = tokens = 0
        for i, batch in enumerate(window):
            batch_samples, batch_tokens = self.collator.count(batch)
            inputs = self.collator.to_device(batch, device)
            check_token_ids(self.inner, inputs["input_ids"])
            if self.config.image_embeddings:
                inputs = self.collator.model_inputs(self.inner, inputs)
            sync = world > 1 and i < len(window) - 1
            with self.model.no_sync() if sync else nullcontext(), self.autocast:
                # loss = sum of token losses / targets of the whole step; DDP averages over ranks, so scale by world
                loss_part = _step_loss(self.model, inputs, targets / world)
                loss_part.backward()
            loss_sum += loss_part.detach() / world
            samples += batch_samples
            tokens += batch_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(_all_reduce_sum(loss_sum))
        counts = _all_reduce_sum(torch.tensor([samples, tokens], dtype=torch.float64, device=device)).tolist()
        return loss, float(grad_norm), int(counts[0]), int(counts[1])


def _resume(config: TrainConfig, output: Path, rank: int, model, optimizer, scheduler, loader) -> dict[str, Any]:
    """Restore the latest checkpoint under ``output`` when resuming: its state (``step`` 0 and nothing else
    when there is none)."""
    if config.resume and (latest := _latest_checkpoint(output, rank)) is not None:
        state = _load_checkpoint(latest, model, optimizer, scheduler)
        loader.load_state_dict(state["loader"])
        logger.info("resumed from %s (step %d, epoch %d)", latest, state["step"], loader.epoch)
        return state
    if config.resume:
        logger.info("no checkpoint in %s: starting from the beginning", output)
    return {"step": 0}


class _Log:
    """Rank 0's account of a run: ``metrics.jsonl`` (cut back to ``step`` on resume) and the progress bar."""

    def __init__(self, path: Path, rank: int, total_steps: int, step: int):
        from tqdm import tqdm

        self.path, self.writes = path, rank == 0
        if self.writes:
            keep_metrics_until(path, step)
        self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not self.writes or None)
        self.loss: float | None = None
        self.eval_loss: float | None = None

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, record: dict[str, Any]) -> None:
        """An optimizer step's metrics."""
        self.loss = record["loss"]
        if self.writes:
            self._write(record)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                samples_s=f"{record['samples_per_s']:.1f}",
                tokens_s=f"{record['tokens_per_s']:.0f}",
                **({"eval_loss": f"{self.eval_loss:.4f}"} if self.eval_loss is not None else {}),
            )
            self.bar.update(1)

    def evaluation(self, step: int, result: EvalResult) -> None:
        """An evaluation after ``step``."""
        self.eval_loss = result.loss
        if self.writes:
            self._write(result.record(step))
            self.bar.set_postfix(loss="-" if self.loss is None else f"{self.loss:.4f}", eval_loss=f"{result.loss:.4f}")

    def close(self) -> None:
        self.bar.close()


def _claim_output(config: TrainConfig, output: Path, rank: int, world: int) -> None:
    """Rank 0 checks ``output`` (and clears it with --overwrite); every rank gets its verdict, so all stop together."""
    verdict: list[str | None] = [None]
    if rank == 0:
        try:
            claim_output(output, resume=config.resume, overwrite=config.overwrite)
        except ConfigError as exc:
            verdict = [str(exc)]
    if world > 1:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ConfigError(verdict[0])


def train(config: TrainConfig, *, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run training; returns the metrics of the steps run in this call (rank 0's view).

    ``on_step(step, metrics)`` is called after each optimizer step (and its checkpoint).
    """
    from transformers import get_cosine_schedule_with_warmup

    rank, world, device = setup_distributed()
    output = Path(config.output)
    _claim_output(config, output, rank, world)
    torch.manual_seed(config.seed)

    stream, collator, loader = _open_data(config)
    manifest = stream.source.manifest
    evaluation = Evaluation(config.eval_data, manifest, config.batch_size or 1) if config.eval_data else None
    model = _prepare_model(config, stream).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = planned_steps(config, stream, config.grad_accum)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    state = _resume(config, output, rank, model, optimizer, scheduler, loader)
    step = state["step"]

    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    take_step = _Stepper(config, model, collator, trainable, optimizer, scheduler, device, world, autocast)
    inner = take_step.inner

    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.json").write_text(json.dumps(config.model_dump(), indent=2, sort_keys=True))
    log = _Log(output / "metrics.jsonl", rank, total_steps, step)
    sources = SourceCounter(stream, state.get("source_samples"))
    history: list[dict[str, Any]] = []
    evaluated_at = None

    def run_evaluation() -> None:  # every rank takes part; rank 0 writes
        nonlocal evaluated_at
        log.evaluation(step, evaluate(inner, evaluation, device, autocast))
        model.train()
        evaluated_at = step

    model.train()
    started = time.perf_counter()
    while step < total_steps and (config.total_epochs is None or loader.epoch < config.total_epochs):
        epoch = loader.epoch
        for window in _windows(loader, config.grad_accum):
            step_start = time.perf_counter()
            loss, grad_norm, samples, tokens = take_step(window)
            step += 1
            seconds = time.perf_counter() - step_start
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "samples": samples,
                "tokens": tokens,
                "samples_per_s": samples / seconds,
                "tokens_per_s": tokens / seconds,
                "elapsed_s": time.perf_counter() - started,
                "skipped": sum(stream.skipped.values()),  # this rank's; rank 0 writes the line
            }
            if (source_samples := sources.update(_all_reduce_numpy)) is not None:
                record["source_samples"] = source_samples
            history.append(record)
            log.step(record)
            if evaluation and config.eval_every and step % config.eval_every == 0:
                run_evaluation()
            if rank == 0 and (step % config.save_every == 0 or step == total_steps):
                _save_checkpoint(
                    output,
                    step,
                    inner,
                    optimizer,
                    scheduler,
                    loader.state_dict(),
                    config.keep_checkpoints,
                    source_samples=record.get("source_samples"),
                )
            if on_step:
                on_step(step, record)
            if step >= total_steps:
                break
    if evaluation and evaluated_at != step:
        run_evaluation()
    log.close()
    if rank == 0:
        _save_final(output, inner)
        _plot_loss(log.path, output / "loss.png")
    if world > 1:
        torch.distributed.barrier()
    leave_distributed()
    return history


def _save_final(output: Path, model: torch.nn.Module) -> None:
    final = output / "final"
    tmp = output / "final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    logger.info("saved %s", final)


def _plot_loss(metrics: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss curve (pip install 'shardkit[plot]')")
        return
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="#1f77b4", label="training")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="#d62728", label="evaluation")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.set_title("shardkit train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
