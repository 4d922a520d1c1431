"""The Tinker trainer: LoRA fine-tuning of a Qwen3-VL, Qwen3.5, Qwen3.6 or Qwen3.8 model through Thinking Machines'
Tinker API.

Datums come from :class:`~shardkit.load.tinker.DatumBatches` (a build whose family renders as the base model's
tinker-cookbook renderer does: :func:`check_base_model`, the lineup in :data:`TINKER_VL_MODELS`). Each step submits
``forward_backward`` with the ``cross_entropy`` loss and ``optim_step`` back to back, and only then waits for
the previous step's results, so the service always has the next step queued
(the pipelining the SDK documentation recommends). The learning rate follows
linear warmup then cosine decay. With ``eval_data``, every ``eval_every``
steps and at the end, the evaluation build's Datums go through the
forward-only call (``forward``, no optimizer step), queued right behind that
step, and their token-weighted mean loss is written as ``eval_loss``.

Every ``save_every`` steps the weights and optimizer are saved on Tinker
(``save_state``) and ``tinker_state.json`` records that path with the step and
the loader's resume state; ``resume=True`` continues from it exactly. Needs
``TINKER_API_KEY`` in the environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardkit.errors import ConfigError
from shardkit.load import BuildSource
from shardkit.load.mix import check_compatible
from shardkit.load.tinker import DatumBatches, sample_to_datum
from shardkit.storage import open_fs, write_bytes
from shardkit.train import SourceCounter, TinkerTrainConfig, claim_output, keep_metrics_until, planned_steps
from shardkit.train.evaluate import EvalResult, combine, eval_batches

logger = logging.getLogger(__name__)

STATE_FILE = "tinker_state.json"

#: Tinker's vision-language base models and the renderers tinker-cookbook 0.5.8 recommends for each, its default
#: first (``model_info.py``, the models with ``is_vl``); a build trains one when its family's ``tinker_renderer`` is
#: among them
TINKER_VL_MODELS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3-VL-235B-A22B-Instruct"),
        ("qwen3_vl_instruct",),
    ),
    **dict.fromkeys(
        (
            "Qwen/Qwen3.5-4B",
            "Qwen/Qwen3.5-9B",
            "Qwen/Qwen3.5-27B",
            "Qwen/Qwen3.5-35B-A3B",
            "Qwen/Qwen3.5-397B-A17B",
            "Qwen/Qwen3.6-27B",
            "Qwen/Qwen3.6-35B-A3B",
        ),
        ("qwen3_5", "qwen3_5_disable_thinking", "qwen3_5_preserve_thinking"),
    ),  # fmt: skip
    "Qwen/Qwen3.8-27B": (
        "qwen3_8_xhigh_reasoning",
        "qwen3_8_disable_thinking",
        "qwen3_8_medium_reasoning",
        "qwen3_8_low_reasoning",
    ),
    **dict.fromkeys(("Qwen/Qwen3.5-9B-Base", "Qwen/Qwen3.5-35B-A3B-Base"), ("role_colon",)),
    "moonshotai/Kimi-K2.5": ("kimi_k25", "kimi_k25_disable_thinking"),
    "moonshotai/Kimi-K2.6": ("kimi_k26", "kimi_k26_disable_thinking", "kimi_k26_preserve_thinking"),
    "nvidia/NVIDIA-Nemotron-3.5-Super-VL-120B-A12B-BF16": (
        "nemotron3_ultra",
        "nemotron3_ultra_disable_thinking",
        "nemotron3_ultra_medium_thinking",
        "nemotron3_ultra_preserve_thinking",
    ),
    **dict.fromkeys(("thinkingmachines/Inkling", "thinkingmachines/Inkling-Small"), ("tml_v0",)),
}

#: why no family renders as these renderers (the default renderers of the models above that shardkit does not serve)
NOT_SERVED: dict[str, str] = {
    "role_colon": "the cookbook's role_colon renderer (the Base models) takes no images: it raises on an image part",
    "kimi_k25": "another tokenizer and chat format (Kimi's), not Qwen's",
    "kimi_k26": "another tokenizer and chat format (Kimi's), not Qwen's",
    "nemotron3_ultra": "another tokenizer and chat format (Nemotron's), not Qwen's",
    "tml_v0": "Thinking Machines' own format, rendered by the tml-renderers package, not Qwen's",
}


def base_model_renderers(base_model: str) -> tuple[str, ...]:
    """The tinker-cookbook renderers recommended for ``base_model`` (a ``:checkpoint`` suffix ignored): from
    :data:`TINKER_VL_MODELS`, else from the installed cookbook's ``model_info``; refused when neither knows it."""
    name = base_model.split(":", 1)[0]
    if name in TINKER_VL_MODELS:
        return TINKER_VL_MODELS[name]
    try:
        from tinker_cookbook.model_info import get_model_attributes

        return tuple(get_model_attributes(name).recommended_renderers)
    except Exception:  # not installed, or the cookbook does not know the model (KeyError, ConfigurationError)
        raise ConfigError(
            f"--base-model {base_model}: shardkit does not know which renderer Tinker trains it with; the models it "
            f"knows are {', '.join(TINKER_VL_MODELS)} (tinker-cookbook 0.5.8; with tinker-cookbook installed, the "
            "ones its model_info names)"
        ) from None


def check_base_model(family: str, base_model: str, data: str) -> None:
    """Refuse a build (at ``data``, made for ``family``) whose tokens are not those of any renderer tinker-cookbook
    recommends for ``base_model``: Tinker would train the model on another chat format than its own."""
    from shardkit.families import FAMILIES, get_family

    renderers = base_model_renderers(base_model)
    own = get_family(family).tinker_renderer
    if own in renderers:
        return
    fits = [f.name for f in FAMILIES.values() if f.tinker_renderer in renderers]
    have = f"renders as tinker-cookbook's {own}" if own else "has no Tinker renderer's tokens"
    if fits:
        advice = f"build with --model {' or --model '.join(fits)}"
    else:
        advice = f"shardkit has no family for it ({NOT_SERVED.get(renderers[0], 'not a Qwen chat format')})"
    raise ConfigError(
        f"{data} was built for {family}, which {have}; Tinker trains {base_model} with {', '.join(renderers)}: {advice}"
    )


def learning_rate(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total`` (step is 0-based)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def default_service() -> Any:
    """A ``tinker.ServiceClient``; fails fast with a clear message when ``TINKER_API_KEY`` is not set."""
    if not os.environ.get("TINKER_API_KEY"):
        raise ConfigError(
            "--backend tinker needs TINKER_API_KEY in the environment (create a key in the Tinker console)"
        )
    try:
        import tinker
    except ImportError:
        raise ConfigError("--backend tinker needs the Tinker SDK: pip install 'shardkit[tinker]'") from None
    return tinker.ServiceClient()


def _result(value: Any) -> Any:
    return value.result() if hasattr(value, "result") else value


def _mean_nll(output: Any, datums: list[Any]) -> float:
    """Weighted mean negative log-likelihood of a step, as tinker-cookbook reports it."""
    total = weight = 0.0
    for result, datum in zip(output.loss_fn_outputs, datums, strict=True):
        logprobs = result["logprobs"].data
        weights = datum.loss_fn_inputs["weights"].data
        total += sum(lp * w for lp, w in zip(logprobs, weights, strict=True))
        weight += sum(weights)
    return -total / weight if weight else float("nan")


class TinkerEvaluation:
    """An evaluation build as Datums (unnormalised weights), sent with the forward-only call (no optimizer step).

    :meth:`submit` queues one ``forward`` per batch of ``batch_size`` samples
    (rule: :mod:`shardkit.train.evaluate`, one rank); :meth:`collect` waits
    for them and gives the mean loss per target token.
    """

    def __init__(self, location: str, train_manifest: Any, batch_size: int):
        self.source = BuildSource(location)
        check_compatible([train_manifest, self.source.manifest], ["--data", location], ["model family", "tokenizer"])
        if not len(self.source):
            raise ConfigError(f"the evaluation build {location} has no samples")
        self.batches = eval_batches(len(self.source), batch_size)

    def datums(self, batch: Any) -> list[Any]:
        return [sample_to_datum(self.source.get(int(i)), reduction="none") for i in batch]

    def submit(self, client: Any) -> list[tuple[list[Any], Any]]:
        """Queue the forward passes of every batch; ``(datums, future)`` per batch."""
        return [(datums, client.forward(datums, "cross_entropy")) for datums in map(self.datums, self.batches)]

    def collect(self, submitted: list[tuple[list[Any], Any]]) -> EvalResult:
        loss_sums, tokens = [], []
        for datums, future in submitted:
            output = _result(future)
            for result, datum in zip(output.loss_fn_outputs, datums, strict=True):
                weights = datum.loss_fn_inputs["weights"].data
                loss_sums.append(-math.fsum(lp * w for lp, w in zip(result["logprobs"].data, weights, strict=True)))
                tokens.append(int(sum(weights)))
        return combine(loss_sums, tokens, len(self.source))


@dataclass
class _Queued:
    """A step queued on the service; its results are collected one step later, while the next one runs."""

    step: int
    epoch: int
    lr: float
    datums: list[Any]
    forward_backward: Any
    optim_step: Any
    loader: dict[str, Any]  # the loader's state after this step's batch
    save: Any  # the queued save_state, on a checkpoint step
    eval: Any  # the queued evaluation, on an evaluation step
    source_samples: dict[str, int] | None
    started: float

    @property
    def tokens(self) -> int:
        return sum(d.model_input.length + 1 for d in self.datums)


@dataclass
class _Finisher:
    """Collects a queued step's results: ``metrics.jsonl`` (and the evaluation's line), the resume state on a
    checkpoint step, ``on_step``."""

    config: TinkerTrainConfig
    evaluation: TinkerEvaluation | None
    on_step: Callable[[int, dict[str, Any]], None] | None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    def __call__(self, queued: _Queued) -> None:
        output_fb = queued.forward_backward.result()
        queued.optim_step.result()
        seconds = time.perf_counter() - queued.started
        samples, tokens = len(queued.datums), queued.tokens
        record = {
            "step": queued.step,
            "epoch": queued.epoch,
            "loss": _mean_nll(output_fb, queued.datums),
            "lr": queued.lr,
            "samples": samples,
            "tokens": tokens,
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
        }
        if queued.source_samples is not None:
            record["source_samples"] = queued.source_samples
        self.history.append(record)
        with (self.output / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
            if queued.eval is not None and self.evaluation is not None:
                result = self.evaluation.collect(queued.eval)
                f.write(json.dumps(result.record(queued.step)) + "\n")
                logger.info("step %d eval_loss %.4f", queued.step, result.loss)
        logger.info("step %d loss %.4f", queued.step, record["loss"])
        if queued.save is not None:
            state = {
                "step": queued.step,
                "base_model": self.config.base_model,
                "tinker_path": queued.save.result().path,
                "loader": queued.loader,
                "source_samples": queued.source_samples,
            }
            fs, _ = open_fs(str(self.output))
            write_bytes(fs, str(self.output / STATE_FILE), json.dumps(state, indent=2).encode())
        if self.on_step:
            self.on_step(queued.step, record)


def _client(config: TinkerTrainConfig, service: Any, batches: DatumBatches) -> tuple[Any, dict[str, Any]]:
    """A training client: restored from the last saved state when resuming (with the loader), else a new LoRA;
    and the saved state (``step`` 0 when starting)."""
    state_path = Path(config.output) / STATE_FILE
    if config.resume and state_path.exists():
        state = json.loads(state_path.read_text())
        if state["base_model"] != config.base_model:
            raise ConfigError(f"{state_path} is a run of {state['base_model']}, not {config.base_model}")
        client = _result(service.create_training_client_from_state_with_optimizer(state["tinker_path"]))
        batches.load_state_dict(state["loader"])
        logger.info("resumed from %s at step %d", state["tinker_path"], state["step"])
        return client, state
    client = service.create_lora_training_client(base_model=config.base_model, rank=config.lora_rank, seed=config.seed)
    return _result(client), {"step": 0}


def train_tinker(
    config: TinkerTrainConfig,
    *,
    service: Any = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the Tinker loop; returns the metrics of the steps run in this call.

    ``service`` defaults to :func:`default_service` (tests pass a stand-in).
    """
    import tinker

    claim_output(config.output, resume=config.resume, overwrite=config.overwrite)
    service = service or default_service()
    stream = config.open_stream(batch_size=config.batch_size, seed=config.seed)
    data = ", ".join(config.data) or config.mix
    check_base_model(stream.source.manifest.config.family.name, config.base_model, data)
    batches = DatumBatches(stream)
    total_steps = planned_steps(config, stream)
    evaluation = (
        TinkerEvaluation(config.eval_data, stream.source.manifest, config.batch_size) if config.eval_data else None
    )
    warmup = round(config.warmup_ratio * total_steps)

    Path(config.output).mkdir(parents=True, exist_ok=True)
    client, state = _client(config, service, batches)
    step = state["step"]
    keep_metrics_until(Path(config.output) / "metrics.jsonl", step)
    sources = SourceCounter(stream, state.get("source_samples"))
    finish = _Finisher(config, evaluation, on_step)
    pending: _Queued | None = None
    while step < total_steps and (config.total_epochs is None or batches.epoch < config.total_epochs):
        epoch = batches.epoch
        for datums in batches:
            lr = learning_rate(step, total_steps, warmup, config.lr)
            started = time.perf_counter()
            forward_backward = client.forward_backward(datums, "cross_entropy")
            optim_step = client.optim_step(tinker.types.AdamParams(learning_rate=lr, weight_decay=config.weight_decay))
            step += 1
            # a save queued right after this step's update holds exactly the weights after it
            save = (
                client.save_state(f"step-{step:06d}") if step % config.save_every == 0 or step == total_steps else None
            )
            # evaluated on the weights after this step, queued behind it: training goes on while it runs
            due = config.eval_every and step % config.eval_every == 0 or step == total_steps
            queued = _Queued(
                step,
                epoch,
                lr,
                datums,
                forward_backward,
                optim_step,
                loader=batches.state_dict(),
                save=save,
                eval=evaluation.submit(client) if evaluation and due else None,
                source_samples=sources.update(),
                started=started,
            )
            if pending is not None:  # the next step is already queued on the service
                finish(pending)
            pending = queued
            if step >= total_steps:
                break
    if pending is not None:
        finish(pending)
    return finish.history
