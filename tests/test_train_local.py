"""The local torch trainer on CPU with a tiny randomly initialised Qwen2-VL (and a small tokenizer)."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from shardkit.cli import main
from shardkit.load.mix import MixStream
from shardkit.synthetic import make_clinical_dataset
from shardkit.testing import TINY_VOCAB_SIZE
from shardkit.train import local
from shardkit.train.local import TrainConfig, train
from tests.helpers import metrics, torchrun, write_jsonl
from tests.test_grounding import PICTURES, SWIFT_RECORDS, picture

pytestmark = pytest.mark.slow  # trains tiny models


def run(tmp_path, data, model, name="run", **options):
    defaults = {"lr": 1e-2, "batch_size": 4, "num_workers": 0, "warmup_ratio": 0.1, "seed": 0}
    config = TrainConfig.create(data=data, model=model, output=str(tmp_path / name), **{**defaults, **options})
    return config, train(config)


def test_full_fine_tune_memorises_and_writes_its_outputs(tmp_path, memorisable, tiny_model):
    config, history = run(tmp_path, memorisable, tiny_model, max_steps=30, save_every=10)
    losses = [h["loss"] for h in history]
    assert len(losses) == 30 and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    output = tmp_path / "run"
    rows = metrics(output)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["samples"] == 4 and rows[0]["tokens_per_s"] > 0 and rows[-1]["lr"] < rows[3]["lr"]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    assert (output / "loss.png").stat().st_size > 1000
    from transformers import Qwen2VLForConditionalGeneration

    final = Qwen2VLForConditionalGeneration.from_pretrained(output / "final")
    assert final.config.text_config.vocab_size == TINY_VOCAB_SIZE


def test_lora_learns_and_saves_an_adapter(tmp_path, memorisable, tiny_model):
    _, history = run(
        tmp_path, memorisable, tiny_model, max_steps=25, lora_rank=16, save_every=25, attn_implementation="eager"
    )
    losses = [h["loss"] for h in history]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()


@pytest.fixture
def fed(monkeypatch):
    """The inputs each micro-batch fed to the model, in order, as they reach the loss (``fed[-1]``: the last)."""
    seen = []
    step_loss = local._step_loss

    def recording(model, inputs, num_items):
        seen.append({k: inputs[k].detach().clone() for k in ("input_ids", "pixel_values")})
        return step_loss(model, inputs, num_items)

    monkeypatch.setattr(local, "_step_loss", recording)
    return seen


def assert_same_inputs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_an_augmented_run_stopped_mid_epoch_resumes_with_the_same_pixels_and_losses(
    tmp_path, memorisable, tiny_model, fed
):
    # 8 samples, 1 a batch, 2 batches a step: 4 steps an epoch; checkpoints at 3 and 6, a crash after step 4, so
    # the resumed run starts with the last batches of epoch 0 and goes on into epoch 1 (other augmentations)
    options = ["--lr", "1e-2", "--batch-size", "1", "--grad-accum", "2", "--num-workers", "1", "--warmup-ratio", "0.1"]
    options += ["--max-steps", "6", "--save-every", "3", "--seed", "0", "--augment"]
    whole = tmp_path / "whole"
    assert main(["train", "--data", memorisable, "--model", tiny_model, "--output", str(whole), *options]) == 0
    uninterrupted = fed[:]
    config = TrainConfig.model_validate(json.loads((whole / "train_config.json").read_text()))
    assert config.augment and config.grad_accum == 2

    def crash(step, record):
        if step == 4:
            raise KeyboardInterrupt

    fed.clear()
    broken = config.model_copy(update={"output": str(tmp_path / "broken")})
    with pytest.raises(KeyboardInterrupt):
        train(broken, on_step=crash)
    assert_same_inputs(fed, uninterrupted[:8])
    assert [r["step"] for r in metrics(tmp_path / "broken")] == [1, 2, 3, 4]
    fed.clear()
    resumed = train(broken.model_copy(update={"resume": True}))
    assert [h["step"] for h in resumed] == [4, 5, 6] and [h["epoch"] for h in resumed] == [0, 1, 1]
    assert_same_inputs(fed, uninterrupted[6:])  # the same samples with the same changes, epoch 1's included
    # losses step for step; exact: the same deterministic CPU ops on the same inputs and restored weights
    expected, got = metrics(whole), metrics(tmp_path / "broken")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in got] == [
        (r["loss"], r["lr"], r["grad_norm"]) for r in expected
    ]

    # the pixels fed are not the stored ones: a plain run feeds the same samples with other pixels
    fed.clear()
    plain = config.model_copy(update={"output": str(tmp_path / "plain"), "augment": False, "max_steps": 1})
    train(plain)
    assert len(fed) == 2
    for augmented, stored in zip(uninterrupted[:2], fed, strict=True):
        assert torch.equal(augmented["input_ids"], stored["input_ids"])
        assert augmented["pixel_values"].shape == stored["pixel_values"].shape
        assert not torch.equal(augmented["pixel_values"], stored["pixel_values"])
    # epoch 1 changes a sample's images otherwise than epoch 0 did
    epoch0 = {tuple(f["input_ids"].flatten().tolist()): f["pixel_values"] for f in uninterrupted[:8]}
    epoch1 = [(tuple(f["input_ids"].flatten().tolist()), f["pixel_values"]) for f in uninterrupted[8:]]
    assert all(ids in epoch0 and not torch.equal(epoch0[ids], pixels) for ids, pixels in epoch1)


def test_augment_on_a_build_with_boxes_trains_unrotated(tmp_path, tiny_model, tiny_tokenizer, make_build, fed, caplog):
    for name, (size, blocks) in PICTURES.items():
        picture(tmp_path / name, size, blocks)
    data = write_jsonl(tmp_path / "swift.jsonl", SWIFT_RECORDS)
    boxes = make_build(data, model="qwen2_vl", tokenizer=tiny_tokenizer, max_pixels=56 * 56)
    args = ["train", "--data", boxes, "--model", tiny_model, "--max-steps", "1", "--num-workers", "0"]
    assert main([*args, "--output", str(tmp_path / "augmented"), "--augment"]) == 0
    assert "carries 11 grounding boxes or points, so its images are not rotated" in caplog.text
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    augmented, plain = fed
    assert torch.equal(augmented["input_ids"], plain["input_ids"])
    assert not torch.equal(augmented["pixel_values"], plain["pixel_values"])  # brightness and contrast still change


def test_packed_training_gives_the_padded_loss_and_learns(tmp_path, memorisable, tiny_model):
    # a first step over the whole epoch: the same samples and weights as one padded batch of all 8
    _, padded = run(tmp_path, memorisable, tiny_model, name="padded", max_steps=1, batch_size=8)
    output = tmp_path / "packed"
    options = ["--lr", "1e-2", "--warmup-ratio", "0.1", "--num-workers", "0", "--save-every", "100"]
    args = ["train", "--data", memorisable, "--model", tiny_model, "--output", str(output), *options]
    assert main([*args, "--pack", "--batch-tokens", "800", "--grad-accum", "2", "--max-steps", "12"]) == 0
    rows = metrics(output)
    assert rows[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-5)
    assert all(r["samples"] == 8 and r["tokens"] == padded[0]["tokens"] for r in rows)  # no padding counted
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_two_process_torchrun_on_cpu_resumes_mid_epoch_with_the_same_losses(tmp_path, memorisable, tiny_model):
    # 8 samples, 2 a rank a step: 2 steps an epoch; a checkpoint at 3 (epoch 1's first step), a stop after 4
    options = ["--data", memorisable, "--model", tiny_model, "--max-steps", "5", "--batch-size", "2"]
    options += ["--num-workers", "1", "--lr", "1e-2", "--save-every", "3"]

    def torchrun_train(output, *extra, script=("-m", "shardkit.cli", "-q", "train")):
        command = [*torchrun(2), *script, *options, "--output", str(output), *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    whole = torchrun_train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    rows = metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["samples"] == 4 for r in rows)  # 2 per rank, counted over both ranks
    assert (tmp_path / "whole" / "final" / "config.json").exists()
    assert whole.stdout.count("trained to step 5") == 1  # only rank 0 reports

    broken = tmp_path / "broken"
    stopped = torchrun_train(broken, script=(str(Path(__file__).with_name("distributed_train.py")), "4"))
    assert stopped.returncode != 0 and "trained to step" not in stopped.stdout, stopped.stderr[-3000:]
    assert [r["step"] for r in metrics(broken)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["step-000003"]
    # both ranks resume from rank 0's checkpoint and stay in step (a rank left at step 0 would hang the run)
    again = torchrun_train(broken, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("trained to step 5") == 1
    got = metrics(broken)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5] and [r["epoch"] for r in got] == [0, 0, 1, 1, 2]
    # exact: the same deterministic CPU ops (gloo sums of 2 ranks included) on the same inputs and weights
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in got] == [(r["loss"], r["lr"], r["grad_norm"]) for r in rows]


def test_cli_errors_are_clear(tmp_path, memorisable, capsys):
    assert main(["train", "--data", memorisable, "--output", str(tmp_path / "o")]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert (
        main(["train", "--data", memorisable, "--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
        == 2
    )
    assert "cannot load model" in capsys.readouterr().err
    assert main(["train", "--data", memorisable, "--model", "m", "--output", str(tmp_path / "o"), "--pack"]) == 2
    assert "--pack needs --batch-tokens" in capsys.readouterr().err


@pytest.fixture(scope="module")
def split(tmp_path_factory, tiny_tokenizer):
    """The clinical seed's layout built with --val-fraction 0.25: OUT/train and OUT/val."""
    root = tmp_path_factory.mktemp("split")
    data = make_clinical_dataset(root / "data", cases=12, seed=4, megapixels=(0.01, 0.02), images_per_case=(1, 1))
    args = ["build", str(data.jsonl), "--out", str(root / "shards"), "--max-pixels", "3136", "--val-fraction", "0.25"]
    args += ["--tokenizer", tiny_tokenizer]
    assert main(["-q", *args, "--no-progress"]) == 0
    return root / "shards"


def test_a_mix_with_evaluation_records_sources_and_eval_loss(tmp_path, split, memorisable, tiny_model):
    train_build, val = str(split / "train"), str(split / "val")
    output = tmp_path / "mix"
    options = ["--batch-size", "3", "--num-workers", "0", "--lr", "1e-2", "--save-every", "2", "--max-steps", "3"]
    args = ["train", "--data", train_build, "--data", memorisable, "--weights", "0.5,0.5", "--epoch-size", "12"]
    args += ["--eval-data", val, "--eval-every", "2", "--model", tiny_model, "--output", str(output), *options]
    assert main(args) == 0
    rows = metrics(output)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [2, 3]  # every 2, and the end
    assert [sum(r["source_samples"].values()) for r in steps] == [3, 6, 9]
    plan = MixStream([train_build, memorisable], weights=[0.5, 0.5], epoch_size=12, batch_size=3, seed=0)
    first = np.concatenate(plan.whole_epoch(0).sequence[:3])  # the 9 samples of the 3 steps
    counts = np.bincount(plan.source.build_of(first), minlength=2).tolist()
    expected = dict(zip([train_build, memorisable], counts, strict=True))
    assert steps[-1]["source_samples"] == expected
    val_samples = json.loads((split / "val" / "manifest.json").read_text())["num_samples"]
    assert all(r["eval_samples"] == val_samples and r["eval_tokens"] > 0 for r in evals)
    assert all(math.isfinite(r["eval_loss"]) for r in evals) and evals[0]["eval_loss"] != evals[1]["eval_loss"]
    assert (output / "loss.png").stat().st_size > 1000
    state = json.loads((output / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["source_samples"] == steps[-1]["source_samples"]
