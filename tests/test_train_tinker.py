"""The Tinker training loop.

The Tinker service cannot be reached from here, so these tests run the loop
against an in-process STAND-IN for ``tinker.ServiceClient`` and its training
client: it implements the same methods (create_lora_training_client,
create_training_client_from_state_with_optimizer, forward_backward, forward,
optim_step, save_state, futures with .result()) and records every call and
Datum it receives. It proves the loop's order, pipelining, schedule and resume; the
Datums themselves are proven equal to tinker-cookbook's in test_load_tinker.py.
"""

import json

import pytest
import tinker

from shardkit.cli import main
from shardkit.errors import ConfigError
from shardkit.load import ShardStream
from shardkit.load.mix import MixStream
from shardkit.load.tinker import DatumBatches, sample_to_datum
from shardkit.train import TrainConfig, claim_output, planned_steps
from shardkit.train.tinker import TinkerTrainConfig, default_service, learning_rate, train_tinker


class Future:
    def __init__(self, events, name, value):
        self.events, self.name, self.value = events, name, value

    def result(self):
        self.events.append(("result", self.name))
        return self.value


class StandInTrainingClient:
    """Records what the loop sends; answers with log-probabilities that improve with every step."""

    def __init__(self, events, steps_done=0):
        self.events = events
        self.steps_done = steps_done
        self.datums = []
        self.forwarded = []

    def forward(self, datums, loss_fn):
        """The forward-only call: log-probabilities that depend on the target token and the step, no update."""
        assert loss_fn == "cross_entropy"
        self.forwarded.append(datums)
        self.events.append(("forward", len(self.forwarded)))
        outputs = [{"logprobs": tinker.TensorData(data=logprobs(d, self.steps_done), dtype="float32")} for d in datums]
        return Future(
            self.events,
            f"fw{len(self.forwarded)}",
            tinker.types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics={}),
        )

    def forward_backward(self, datums, loss_fn):
        assert loss_fn == "cross_entropy"
        self.datums.append(datums)
        step = len(self.datums)
        self.events.append(("forward_backward", step))
        logprob = -5.0 / (1 + self.steps_done)
        outputs = [
            {
                "logprobs": tinker.TensorData(
                    data=[logprob] * d.loss_fn_inputs["weights"].shape[0],
                    dtype="float32",
                    shape=d.loss_fn_inputs["weights"].shape,
                )
            }
            for d in datums
        ]
        return Future(
            self.events,
            f"fb{step}",
            tinker.types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics={}),
        )

    def optim_step(self, params):
        self.steps_done += 1
        self.events.append(("optim_step", params.learning_rate))
        return Future(self.events, f"opt{len(self.datums)}", object())

    def save_state(self, name):
        self.events.append(("save_state", name))
        path = f"tinker://stand-in/{self.steps_done}/{name}"
        return Future(self.events, name, type("Saved", (), {"path": path})())


def describe(datum):
    """What a Datum holds: its input chunks, target tokens and weights."""
    chunks = [
        (type(c).__name__, getattr(c, "tokens", None), getattr(c, "data", None)) for c in datum.model_input.chunks
    ]
    inputs = datum.loss_fn_inputs
    return chunks, inputs["target_tokens"].data, inputs["weights"].data


def logprobs(datum, steps_done):
    return [-(t % 5 + 1) / (1 + steps_done) for t in datum.loss_fn_inputs["target_tokens"].data]


class StandInService:
    def __init__(self):
        self.events, self.clients, self.restored_from = [], [], None

    def create_lora_training_client(self, base_model, rank, seed):
        self.base_model, self.rank = base_model, rank
        self.clients.append(StandInTrainingClient(self.events))
        return self.clients[-1]

    def create_training_client_from_state_with_optimizer(self, path):
        self.restored_from = path
        self.clients.append(StandInTrainingClient(self.events, steps_done=int(path.split("/")[3])))
        return self.clients[-1]


def config(data, output, **options):
    defaults = {
        "base_model": "Qwen/Qwen3-VL-30B-A3B-Instruct",
        "batch_size": 8,
        "epochs": 1,
        "lr": 1e-4,
        "warmup_ratio": 0.2,
    }
    return TinkerTrainConfig.create(data=data, output=str(output), **{**defaults, **options})


def tokens(batches):
    return [[d.loss_fn_inputs["target_tokens"].data for d in batch] for batch in batches]


def test_one_epoch_sends_every_batch_in_order_pipelined(qwen3_build, tmp_path):
    service = StandInService()
    history = train_tinker(config(qwen3_build, tmp_path, save_every=2), service=service)
    expected = list(DatumBatches(ShardStream(qwen3_build, batch_size=8, seed=0)))
    client = service.clients[0]
    steps = len(expected)
    assert tokens(client.datums) == tokens(expected) and len(history) == steps == 6  # 47 samples, 8 a batch
    assert service.base_model == "Qwen/Qwen3-VL-30B-A3B-Instruct" and service.rank == 32
    lrs = [e[1] for e in service.events if e[0] == "optim_step"]
    assert lrs == pytest.approx([learning_rate(s, steps, 1, 1e-4) for s in range(steps)]) and lrs[0] == 1e-4
    # pipelining: step 2 is submitted before step 1's result is awaited
    order = service.events
    assert order.index(("forward_backward", 2)) < order.index(("result", "fb1"))
    # a save comes right after its step's update, before the next step is submitted
    save = order.index(("save_state", "step-000002"))
    assert order[save - 1] == ("optim_step", lrs[1]) and save < order.index(("forward_backward", 3))
    losses = [h["loss"] for h in history]
    assert losses[0] == pytest.approx(5.0) and losses == sorted(losses, reverse=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    state = json.loads((tmp_path / "tinker_state.json").read_text())
    assert state["step"] == 6 and state["tinker_path"].endswith("step-000006") and state["loader"]["epoch"] == 1


def test_both_trainers_count_their_steps_by_one_rule(qwen3_build, tmp_path):
    stream = ShardStream(qwen3_build, batch_size=8, seed=0)  # 47 samples: 6 batches
    assert planned_steps(config(qwen3_build, tmp_path, epochs=2), stream) == 12
    assert planned_steps(config(qwen3_build, tmp_path, epochs=None, max_steps=5), stream) == 5
    local = TrainConfig.create(data=qwen3_build, model="m", output=str(tmp_path), epochs=2, grad_accum=4)
    assert planned_steps(local, stream, local.grad_accum) == 4  # 2 steps an epoch, the second of 2 batches
    with pytest.raises(ConfigError, match=r"too few samples for a batch per rank \(64 ranks\)"):
        planned_steps(local, ShardStream(qwen3_build, batch_size=8, rank=0, world_size=64), local.grad_accum)


def test_a_stopped_run_resumes_from_its_saved_state(qwen3_build, tmp_path):
    whole = StandInService()  # the stand-in: the Tinker service cannot be reached from the tests
    train_tinker(config(qwen3_build, tmp_path / "whole", save_every=2), service=whole)

    def stop(step, record):
        if step == 3:
            raise KeyboardInterrupt

    first = StandInService()
    with pytest.raises(KeyboardInterrupt):
        train_tinker(config(qwen3_build, tmp_path / "run", save_every=2), service=first, on_step=stop)
    second = StandInService()
    history = train_tinker(config(qwen3_build, tmp_path / "run", save_every=2, resume=True), service=second)
    assert second.restored_from.endswith("step-000002")
    assert [h["step"] for h in history] == [3, 4, 5, 6]
    # the stand-in service saw the very Datums (tokens, image bytes, targets, weights) the uninterrupted run sent
    resent = [[describe(d) for d in batch] for batch in second.clients[0].datums]
    assert resent == [[describe(d) for d in batch] for batch in whole.clients[0].datums[2:]]
    assert [h["lr"] for h in history] == pytest.approx([e[1] for e in whole.events if e[0] == "optim_step"][2:])


def test_needs_an_api_key_and_a_qwen3_build(monkeypatch, builds, qwen3_build, tmp_path, capsys):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="TINKER_API_KEY"):
        default_service()
    assert (
        main(
            [
                "train",
                "--backend",
                "tinker",
                "--base-model",
                "Qwen/Qwen3-VL-8B-Instruct",
                "--data",
                qwen3_build,
                "--output",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "TINKER_API_KEY" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="build with --model qwen3_vl"):
        train_tinker(config(builds["tar"], tmp_path), service=StandInService())


def test_evaluation_sends_every_eval_datum_through_the_forward_only_call(qwen3_build, tmp_path):
    service = StandInService()  # the stand-in: the Tinker service cannot be reached from the tests
    options = {"eval_data": qwen3_build, "eval_every": 3, "max_steps": 4, "epochs": None}
    train_tinker(config(qwen3_build, tmp_path, **options), service=service)
    client = service.clients[0]
    stream = ShardStream(qwen3_build, batch_size=8, shuffle=False)
    samples = [s for batch in stream for s in batch]  # the eval build in manifest order, each sample once
    expected = [sample_to_datum(s, reduction="none") for s in samples]  # raw weights: token-weighted sums
    assert len(client.forwarded) == 12  # 2 evaluations (step 3, and the end) of 6 batches of up to 8
    for evaluation in (client.forwarded[:6], client.forwarded[6:]):
        assert [describe(d) for batch in evaluation for d in batch] == [describe(d) for d in expected]
    events = service.events
    optim_steps = [i for i, e in enumerate(events) if e[0] == "optim_step"]
    assert len(optim_steps) == 4  # evaluation never updates the weights
    first_forward = events.index(("forward", 1))
    assert optim_steps[2] < first_forward < events.index(("forward_backward", 4))  # queued right after step 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 4]
    for row, steps_done in zip(evals, (3, 4), strict=True):
        weights = [w for d in expected for w in d.loss_fn_inputs["weights"].data]
        lps = [lp for d in expected for lp in logprobs(d, steps_done)]
        assert row["eval_loss"] == pytest.approx(
            -sum(lp * w for lp, w in zip(lps, weights, strict=True)) / sum(weights)
        )
        assert row["eval_samples"] == 47 and row["eval_tokens"] == sum(weights)


def test_a_mix_of_builds_on_tinker_records_its_sources(qwen3_build, small_dataset, tmp_path):
    from shardkit.build import build
    from shardkit.config import BuildConfig

    jsonl = tmp_path / "three.jsonl"
    jsonl.write_text("\n".join(small_dataset.jsonl.read_text().splitlines()[:3]) + "\n")
    three = tmp_path / "three"
    root = str(small_dataset.jsonl.parent)
    build(BuildConfig.create(input=str(jsonl), out=str(three), model="qwen3_vl", image_root=root), progress=False)
    service = StandInService()
    data = [qwen3_build, str(three)]
    history = train_tinker(config(data, tmp_path / "run", weights=[1, 1], epoch_size=16), service=service)
    expected = list(DatumBatches(MixStream(data, weights=[1, 1], epoch_size=16, batch_size=8, seed=0)))
    assert tokens(service.clients[0].datums) == tokens(expected) and len(history) == 2
    assert history[-1]["source_samples"] == {qwen3_build: 8, str(three): 8}
    assert json.loads((tmp_path / "run" / "tinker_state.json").read_text())["source_samples"] == {
        qwen3_build: 8,
        str(three): 8,
    }


def test_an_output_holding_a_run_is_refused_unless_resumed_or_overwritten(qwen3_build, tmp_path):
    """A second run into the same --output never starts over silently (metrics.jsonl replaced, checkpoints of two
    runs mixed): it is refused with what to do; --overwrite deletes the run's own files only (a Tinker stand-in
    service: the real one cannot be reached from the tests)."""
    out = tmp_path / "run"
    train_tinker(config(qwen3_build, out, max_steps=2, epochs=None), service=StandInService())
    (out / "notes.txt").write_text("mine")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="holds a run .*--resume to continue it, or --overwrite"):
        train_tinker(config(qwen3_build, out, max_steps=2, epochs=None), service=StandInService())
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    with pytest.raises(ValueError, match="--resume or --overwrite, not both"):
        config(qwen3_build, out, resume=True, overwrite=True)
    history = train_tinker(config(qwen3_build, out, max_steps=1, epochs=None, overwrite=True), service=StandInService())
    assert [h["step"] for h in history] == [1]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: kept


def test_claim_output_deletes_only_what_a_run_writes(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    for name in ("metrics.jsonl", "train_config.json", "loss.png", "data.jsonl"):
        (out / name).write_text("x")
    claim_output(out, resume=True, overwrite=False)  # resuming: kept as it is
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "data.jsonl", "loss.png", "metrics.jsonl", "train_config.json"
    ]  # fmt: skip
    claim_output(out, resume=False, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["data.jsonl"]
    claim_output(tmp_path / "new", resume=False, overwrite=False)  # nothing there: fine
