"""Cached image embeddings (shardkit embed): exact against the live frozen vision tower, resumable, refused when
they do not belong to the model or the build. CPU, tiny random models of both families."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from shardkit.cli import main
from shardkit.embed import EmbedConfig
from shardkit.embed.run import embed
from shardkit.errors import ConfigError
from shardkit.load import ShardStream
from shardkit.load.batch import Collator, EmbeddingCollator
from shardkit.load.embeddings import EmbeddedSource
from shardkit.load.torch import TorchLoader
from shardkit.model import vision_fingerprint, vision_tower
from shardkit.shards import read_manifest
from shardkit.shards.embeddings import read_embedding_manifest
from shardkit.synthetic import make_clinical_dataset
from shardkit.testing import tiny_qwen2_vl_config
from shardkit.train.local import TrainConfig, train
from tests.helpers import metrics, torchrun

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]

pytestmark = pytest.mark.slow  # every test here runs shardkit embed (a vision tower over a build) or trains


def model_class(family):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, make_build):
    """12 cases with 1-3 small photos each, in 3 shards."""
    root = tmp_path_factory.mktemp("embed-data")
    data = make_clinical_dataset(root / "data", cases=12, seed=5, megapixels=(0.004, 0.03), images_per_case=(1, 3))
    return make_build(data.jsonl, samples_per_shard=5)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    """(family, folder) of a tiny random model saved to disk."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model_class(request.param)(tiny_qwen2_vl_config(request.param, initializer_range=0.2)).save_pretrained(folder)
    return request.param, str(folder)


@pytest.fixture(scope="module")
def cache(family_model, small_build, tmp_path_factory):
    """float32 embeddings of ``small_build`` by ``family_model``'s vision tower."""
    out = tmp_path_factory.mktemp("cache") / "emb"
    config = EmbedConfig.create(build=small_build, model=family_model[1], out=str(out), dtype="float32", batch_images=4)
    embed(config, progress=False)
    return str(out)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "batching", [{"batch_size": 3}, {"max_tokens": 700}, {"pack_tokens": 700, "sequences_per_batch": 2}]
)
def test_cached_embeddings_give_the_live_frozen_towers_loss_and_gradients(family_model, small_build, cache, batching):
    family, folder = family_model
    model = model_class(family).from_pretrained(folder, dtype=torch.float32)
    assert_cached_gives_the_live_loss_and_gradients(model, small_build, cache, batching)


def assert_cached_gives_the_live_loss_and_gradients(model, small_build, cache, batching):
    """The first batch (``batching``: ShardStream's options) of ``small_build`` gives ``model`` with its vision tower
    frozen the same loss and gradients from the embeddings in ``cache`` as from the pixels."""
    vision_tower(model).requires_grad_(False)
    manifest = read_manifest(small_build)
    live_batches = iter(ShardStream(small_build, seed=1, **batching))
    cached_batches = iter(ShardStream(EmbeddedSource(small_build, cache), seed=1, **batching))
    live_collate, cached_collate = Collator.for_build(manifest), EmbeddingCollator.for_build(manifest)
    live = live_collate(next(live_batches))
    cached = cached_collate(next(cached_batches))
    assert "pixel_values" not in cached and cached["image_embeds"].shape[0] == len(live["pixel_values"]) // 4
    live_loss, live_grads = loss_and_grads(model, live)
    cached_loss, cached_grads = loss_and_grads(model, cached_collate.model_inputs(model, cached))
    assert cached_loss == pytest.approx(live_loss, rel=1e-5)
    assert set(cached_grads) == set(live_grads) and not any("visual" in n for n in live_grads)
    for name, grad in live_grads.items():  # relative difference of each parameter's gradient
        assert float((cached_grads[name] - grad).norm()) <= 1e-5 * float(grad.norm()), name


def test_a_bf16_cache_gives_the_live_loss_to_about_four_digits_a_float32_one_to_float_rounding(
    family_model, small_build, cache, tmp_path
):
    if family_model[0] != "qwen2_vl":
        pytest.skip("one family is enough for the precision")
    family, folder = family_model
    bf16 = tmp_path / "bf16"
    embed(EmbedConfig.create(build=small_build, model=folder, out=str(bf16), dtype="bfloat16"), progress=False)
    model = model_class(family).from_pretrained(folder, dtype=torch.float32)
    manifest = read_manifest(small_build)
    live = Collator.for_build(manifest)(next(iter(ShardStream(small_build, seed=1, batch_size=4))))
    with torch.no_grad():
        live_loss = model(**live).loss.item()
        differences = {}
        for name, embeddings in (("float32", cache), ("bfloat16", str(bf16))):
            collate = EmbeddingCollator.for_build(manifest)
            batch = collate(next(iter(ShardStream(EmbeddedSource(small_build, embeddings), seed=1, batch_size=4))))
            differences[name] = abs(model(**collate.model_inputs(model, batch)).loss.item() - live_loss) / live_loss
    assert differences["float32"] <= 1e-6  # what the README calls identical
    assert 1e-7 < differences["bfloat16"] <= 1e-4  # the fifth significant digit or beyond


def test_the_manifest_names_the_build_and_the_vision_tower(family_model, small_build, cache, capsys):
    manifest = read_embedding_manifest(cache)
    build_manifest = read_manifest(small_build)
    model = model_class(family_model[0]).from_pretrained(family_model[1])
    assert manifest.vision.fingerprint == vision_fingerprint(model) and manifest.vision.hidden_size == 64
    assert manifest.num_samples == build_manifest.num_samples and manifest.num_images == build_manifest.num_images
    assert len(manifest.shards) == len(build_manifest.shards) and manifest.tensors == ["embeds"]
    assert manifest.dtype == "float32" and manifest.num_image_tokens > 0
    # a fingerprint is of the weights' values, not of the dtype they are held in (embed loads bf16 on GPU)
    halved = model.to(torch.bfloat16)
    assert vision_fingerprint(halved) == vision_fingerprint(halved.to(torch.float32))
    assert main(["verify", cache]) == 0
    assert "all match the manifest" in capsys.readouterr().out


def test_loader_with_cached_embeddings_resumes_exactly_with_workers(family_model, small_build, cache):
    def loader():
        return TorchLoader(ShardStream(EmbeddedSource(small_build, cache), pack_tokens=700, seed=2), num_workers=2)

    whole = [b["image_embeds"] for b in loader()]
    first = loader()
    taken = []
    for batch in first:
        taken.append(batch["image_embeds"])
        if len(taken) == 2:
            break
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    taken += [b["image_embeds"] for b in resumed]
    assert len(taken) == len(whole) and all(torch.equal(a, b) for a, b in zip(taken, whole, strict=True))


def test_embed_resumes_after_a_kill_keeping_finished_shards(family_model, small_build, cache, tmp_path, monkeypatch):
    import shardkit.embed.run as embed_module

    out = tmp_path / "emb"
    config = EmbedConfig.create(build=small_build, model=family_model[1], out=str(out), dtype="float32", batch_images=4)
    real_task = embed_module._embed_task

    def dies_on_the_second(task, *args):
        if task == 1:
            raise KeyboardInterrupt  # stands for a kill
        return real_task(task, *args)

    monkeypatch.setattr(embed_module, "_embed_task", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        embed(config, progress=False)
    monkeypatch.setattr(embed_module, "_embed_task", real_task)
    first = out / "shard-000000.tar"
    kept = first.stat().st_ino, first.stat().st_mtime_ns
    assert not (out / "embeddings.json").exists()
    (out / "shard-000001.tar.partial").write_bytes(b"half a shard")  # what a SIGKILL mid-write leaves
    embed(config, progress=False)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in Path(cache).iterdir())
    for shard in read_embedding_manifest(cache).shards:
        assert (out / shard.path).read_bytes() == (Path(cache) / shard.path).read_bytes()
    # corrupt shards are found by verify, and by the loader when asked to verify
    with (out / "shard-000002.tar").open("r+b") as f:
        f.seek(700)
        f.write(b"\xff\xff")
    assert main(["verify", str(out)]) == 1
    with pytest.raises(Exception, match="shard-000002.tar does not match its sha256"):
        EmbeddedSource(small_build, str(out), verify=True)


def test_two_ranks_embed_their_shares_into_the_same_shards(family_model, small_build, cache, tmp_path):
    if family_model[0] != "qwen2_vl":
        pytest.skip("one family is enough for the process layout")
    out = tmp_path / "emb"
    args = ["embed", small_build, "--model", family_model[1], "--out", str(out), "--dtype", "float32"]
    result = subprocess.run(
        [*torchrun(2), "-m", "shardkit.cli", "-q", *args, "--batch-images", "4", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("image tokens") == 1
    assert (out / "embeddings.json").read_bytes() == (Path(cache) / "embeddings.json").read_bytes()


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, memorisable, tiny_model):
    """A build of 8 one-image cases, a tiny Qwen2-VL and its cache (float32)."""
    emb = tmp_path_factory.mktemp("embed-train") / "emb"
    args = ["embed", memorisable, "--model", tiny_model, "--out", str(emb)]
    assert main([*args, "--dtype", "float32", "--no-progress"]) == 0
    return {"data": memorisable, "model": tiny_model, "embeddings": str(emb)}


def test_training_with_the_cache_gives_the_live_frozen_losses_and_resumes(tmp_path, train_setup):
    options = ["--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--num-workers", "0", "--save-every", "2"]
    common = ["train", "--data", train_setup["data"], "--model", train_setup["model"], *options]
    common += ["--freeze-vision-tower"]
    assert main([*common, "--output", str(tmp_path / "live")]) == 0
    cached = [*common, "--image-embeddings", train_setup["embeddings"]]
    assert main([*cached, "--output", str(tmp_path / "cached")]) == 0

    def losses(name):
        return [row["loss"] for row in metrics(tmp_path / name)]

    assert len(losses("live")) == 3 and losses("cached") == pytest.approx(losses("live"), rel=1e-4)

    config = TrainConfig.create(
        data=train_setup["data"], model=train_setup["model"], output=str(tmp_path / "broken"), max_steps=3,
        batch_size=2, lr=1e-2, num_workers=0, save_every=2, freeze_vision_tower=True,
        image_embeddings=train_setup["embeddings"],
    )  # fmt: skip

    def crash(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=crash)
    resumed = train(config.model_copy(update={"resume": True}))
    assert [h["step"] for h in resumed] == [3]
    assert [h["loss"] for h in resumed] == pytest.approx(losses("cached")[2:], rel=1e-6)


def test_a_cache_that_does_not_fit_is_refused(tmp_path, train_setup, small_build, tiny_tokenizer, capsys):
    base = ["train", "--data", train_setup["data"], "--output", str(tmp_path / "o"), "--max-steps", "1"]
    cached = [*base, "--image-embeddings", train_setup["embeddings"], "--num-workers", "0"]
    torch.manual_seed(1)  # other vision weights, same architecture
    other = tmp_path / "other"
    config = tiny_qwen2_vl_config(initializer_range=0.2, tokenizer=tiny_tokenizer)
    model_class("qwen2_vl")(config).save_pretrained(other)
    assert main([*cached, "--model", str(other), "--freeze-vision-tower"]) == 2
    assert "made by another vision tower" in capsys.readouterr().err
    assert main([*cached, "--model", train_setup["model"]]) == 2
    assert "the vision tower would be trained; add --freeze-vision-tower" in capsys.readouterr().err
    assert main([*cached, "--model", train_setup["model"], "--freeze-vision-tower", "--augment"]) == 2
    assert "--augment cannot apply" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="made from another build"):
        EmbeddedSource(small_build, train_setup["embeddings"])
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_freezing_the_vision_tower_leaves_it_unchanged(tmp_path, train_setup):
    from transformers import Qwen2VLForConditionalGeneration

    config = TrainConfig.create(
        data=train_setup["data"], model=train_setup["model"], output=str(tmp_path / "run"), max_steps=2,
        batch_size=4, lr=1e-2, num_workers=0, freeze_vision_tower=True,
    )  # fmt: skip
    train(config)
    before = Qwen2VLForConditionalGeneration.from_pretrained(train_setup["model"])
    after = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    assert vision_fingerprint(after) == vision_fingerprint(before)
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.state_dict()[n])]
    assert changed and not any("visual" in n for n in changed)


@pytest.mark.usefixtures("s3")
def test_embeddings_on_object_storage(family_model, small_build, cache):
    if family_model[0] != "qwen2_vl":
        pytest.skip("one family is enough for storage")
    url = "s3://bucket/emb"
    embed(EmbedConfig.create(build=small_build, model=family_model[1], out=url, dtype="float32"), progress=False)
    assert main(["verify", url]) == 0
    remote = TorchLoader(ShardStream(EmbeddedSource(small_build, url, verify=True), batch_size=4), num_workers=1)
    local = TorchLoader(ShardStream(EmbeddedSource(small_build, cache), batch_size=4))
    assert all(torch.equal(a["image_embeds"], b["image_embeds"]) for a, b in zip(remote, local, strict=True))


def test_overwrite_replaces_embeddings_of_another_dtype(tmp_path, memorisable, tiny_model, capsys):
    out = tmp_path / "emb"
    args = ["embed", memorisable, "--model", tiny_model, "--out", str(out), "--no-progress"]
    assert main([*args, "--dtype", "float32"]) == 0
    assert main([*args, "--dtype", "bfloat16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "embeddings.json").read_text())["dtype"] == "float32"  # refused: left as it was
    assert main([*args, "--dtype", "bfloat16", "--overwrite"]) == 0
    assert json.loads((out / "embeddings.json").read_text())["dtype"] == "bfloat16"
    assert main(["verify", str(out)]) == 0


REFUSED = "--overwrite replaces only a folder of the same kind; choose another folder"


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("shardkit:")]


def test_embed_and_build_never_replace_each_others_folders(tmp_path, memorisable, tiny_model, capsys):
    target = shutil.copytree(memorisable, tmp_path / "build")
    files = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    for overwrite in ([], ["--overwrite"]):
        args = ["embed", str(target), "--model", tiny_model, "--out", str(target), "--no-progress", *overwrite]
        assert main(args) == 2
        err = capsys.readouterr().err
        held = f"{target} holds a shardkit build, not shardkit image embeddings"
        assert errors(err) == [f"shardkit: error: {held}: {REFUSED}"]
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == files  # nothing deleted or changed
    assert main(["verify", str(target)]) == 0

    emb = tmp_path / "emb"
    assert main(["embed", memorisable, "--model", tiny_model, "--out", str(emb), "--no-progress"]) == 0
    files = {p: p.read_bytes() for p in emb.rglob("*") if p.is_file()}
    data = make_clinical_dataset(tmp_path / "data", cases=2, seed=1, megapixels=(0.01, 0.02))
    for overwrite in ([], ["--overwrite"]):
        assert main(["build", str(data.jsonl), "--out", str(emb), "--no-progress", *overwrite]) == 2
        err = capsys.readouterr().err
        held = f"{emb} holds shardkit image embeddings, not a shardkit build"
        assert errors(err) == [f"shardkit: error: {held}: {REFUSED}"]
    assert {p: p.read_bytes() for p in emb.rglob("*") if p.is_file()} == files
    capsys.readouterr()
    assert main(["verify", str(emb)]) == 0
