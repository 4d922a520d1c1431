"""Qwen3.5 and Qwen3.5-MoE on the local torch path, with tiny random models built here: packing with per-sample
linear attention (losses, logits and gradients packed equal alone; a model it cannot serve refused), training
through ``shardkit train`` (full fine-tune, LoRA on the Gated DeltaNet projections, resume, torchrun, packed steps)
and the frozen tower's embedding cache (the merger's output is all the language model receives)."""

import json
from unittest import mock

import numpy as np
import pytest
import torch

from shardkit.cli import main
from shardkit.embed import EmbedConfig
from shardkit.embed.run import embed, image_features
from shardkit.errors import ConfigError
from shardkit.load import ShardStream
from shardkit.load.batch import Collator
from shardkit.model import load_model, vision_tower
from shardkit.model.packing import (
    cu_seq_lens,
    install,
    installed,
    linear_attention_layers,
    per_sample_linear_attention,
    prepare_packing,
    sample_starts,
)
from shardkit.shards.base import Sample
from shardkit.testing import tiny_qwen3_5_config, write_tiny_qwen3_5_tokenizer
from shardkit.tokenizer import load_tokenizer
from shardkit.train.local import LORA_TARGETS
from tests.helpers import metrics
from tests.test_embed import assert_cached_gives_the_live_loss_and_gradients
from tests.test_load_torch import per_sample_losses, spans
from tests.test_qwen3_vl import (
    assert_accumulated_and_packed_steps_give_the_loss_of_one_batch,
    assert_packed_torchrun_resumes,
    assert_resumes_with_the_same_losses,
    falls,
    run,
    saved_checkpoints,
)


@pytest.fixture(scope="module")
def tiny_qwen3_5_tokenizer(tmp_path_factory) -> str:
    """Folder of a 2,048-token Qwen3.5-style tokenizer (its first ranks and its 33 added tokens), for builds and
    models where token parity is not what is tested."""
    return write_tiny_qwen3_5_tokenizer(tmp_path_factory.mktemp("tiny-qwen3_5-tokenizer"))


@pytest.fixture(scope="module")
def ids(tiny_qwen3_5_tokenizer) -> dict[str, int]:
    """The tiny tokenizer's vision token ids, and ``plain``: its first added id."""
    tokenizer = load_tokenizer(tiny_qwen3_5_tokenizer)[0]
    names = {"image": "<|image_pad|>", "start": "<|vision_start|>", "end": "<|vision_end|>", "plain": "<|endoftext|>"}
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def tiny_qwen3_5(tokenizer: str, moe: bool = False):
    """A tiny random Qwen3.5 (or Qwen3.5-MoE), weights sharp enough that leaks across samples show."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    model_class = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    return model_class(tiny_qwen3_5_config(moe, initializer_range=0.2, tokenizer=tokenizer)).eval()


# --- packing: per-sample linear attention ------------------------------------------------------


def tiny_sample(rng, ids: dict[str, int], key: str, text: int, images: list[tuple[int, int]]) -> Sample:
    """A sample of random text tokens and ``images`` (height, width on the 32-pixel grid), as a build stores it."""
    import io

    from PIL import Image

    tokens, infos, jpegs = [], [], []
    for height, width in images:
        tokens += [*rng.integers(0, ids["plain"], text).tolist(), ids["start"]]
        count = (height // 32) * (width // 32)
        infos.append({"token_start": len(tokens), "num_tokens": count, "grid_thw": [1, height // 16, width // 16]})
        tokens += [ids["image"]] * count + [ids["end"]]
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, format="JPEG")
        jpegs.append(out.getvalue())
    tokens += rng.integers(0, ids["plain"], text).tolist()
    weights = np.ones(len(tokens), dtype=np.float32)
    return Sample(key, {"images": infos}, np.asarray(tokens, dtype=np.int32), weights, jpegs)


@pytest.fixture(scope="module")
def packed(ids):
    """Two packed rows (3 and 2 samples, images in some, the shorter row padded) and the collator that made them."""
    rng = np.random.default_rng(0)
    sequences = [
        [tiny_sample(rng, ids, "a", 9, [(64, 96)]), tiny_sample(rng, ids, "b", 7, [(64, 64), (96, 64)]),
         tiny_sample(rng, ids, "c", 40, [])],
        [tiny_sample(rng, ids, "d", 5, [(64, 64)]), tiny_sample(rng, ids, "e", 12, [])],
    ]  # fmt: skip
    collate = Collator(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
        image_token_id=ids["image"], pad_token_id=0,
    )  # fmt: skip
    return sequences, collate


def per_sample(logits, labels, sequences):
    """Each sample's mean loss and its logits, cut out of a packed batch."""
    losses = per_sample_losses(logits, labels, sequences)
    return [
        (loss, logits[row, start : start + len(sample.input_ids)])
        for loss, (row, start, sample) in zip(losses, spans(sequences), strict=True)
    ]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_packed_losses_equal_each_sample_alone_with_per_sample_linear_attention(packed, tiny_qwen3_5_tokenizer, moe):
    sequences, collate = packed
    batch = collate(sequences)
    assert batch["position_ids"].shape[:2] == (4, 2) and len(batch["cu_seq_lens_q"]) == 6
    positions_only = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    model = tiny_qwen3_5(tiny_qwen3_5_tokenizer, moe)
    with torch.no_grad():
        alone = [(float(model(**collate([s])).loss), model(**collate([s])).logits[0]) for *_, s in spans(sequences)]
        # (without the boundaries: transformers after 5.5 refuses cu_seq_lens_q where its kernels cannot use them)
        leaky = per_sample(model(**positions_only).logits, batch["labels"], sequences)
        with per_sample_linear_attention(model):
            assert installed(model)
            runs = [per_sample(model(**b).logits, batch["labels"], sequences) for b in (batch, positions_only)]
            alone_installed = [float(model(**collate([s])).loss) for *_, s in spans(sequences)]
    assert not installed(model)
    for packed_run in runs:
        assert [loss for loss, _ in packed_run] == pytest.approx([loss for loss, _ in alone], abs=1e-5)
        # logits of size ~7: float noise (the vision tower sees the row's images together) stays under 1e-4 of it
        assert max(float((a - b).abs().max()) for (_, a), (_, b) in zip(packed_run, alone, strict=True)) < 5e-4
    assert alone_installed == pytest.approx([loss for loss, _ in alone], abs=1e-6)  # a lone sample runs as before
    # the control: as transformers runs them, every sample after the first of its row sees its predecessors
    firsts = [start == 0 for _, start, _ in spans(sequences)]
    for (loss, logits), (alone_loss, alone_logits), first in zip(leaky, alone, firsts, strict=True):
        if first:
            assert float((logits - alone_logits).abs().max()) < 1e-4
        else:
            assert float((logits - alone_logits).abs().max()) > 1e-2 and abs(loss - alone_loss) > 1e-3


@pytest.mark.parametrize(
    "checkpointing, boundaries",
    [(False, "cu_seq_lens"), (True, "cu_seq_lens"), (True, "positions")],
    ids=["plain", "checkpointed", "checkpointed-positions-only"],
)
def test_packed_gradients_equal_the_sum_of_each_sample_alone(packed, tiny_qwen3_5_tokenizer, checkpointing, boundaries):

    sequences, collate = packed
    batch = collate(sequences)
    if boundaries == "positions":
        batch = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    model = tiny_qwen3_5(tiny_qwen3_5_tokenizer)
    install(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    def summed(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")

    calls = []
    model.model.language_model.layers[0].linear_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    together = gradients(summed(model(**batch).logits, batch["labels"]))
    assert len(calls) == (2 if checkpointing else 1)  # checkpointed: run again in the backward pass, per sample too
    apart = {}
    for *_, sample in spans(sequences):
        alone = collate([sample])
        for name, grad in gradients(summed(model(**alone).logits, alone["labels"])).items():
            apart[name] = apart.get(name, 0) + grad
    assert together.keys() == apart.keys() and any("linear_attn" in name for name in together)
    for name in together:  # float32 sums in another order: equal to a millionth of each tensor's scale
        scale = float(apart[name].abs().max())
        assert float((together[name] - apart[name]).abs().max()) <= 2e-5 * scale, name


def test_an_unpacked_batch_runs_as_before(packed, tiny_qwen3_5_tokenizer):

    sequences, collate = packed
    batch = collate([sequences[0][0], sequences[1][1]])  # two rows, one padded: attention_mask, no packing
    model = tiny_qwen3_5(tiny_qwen3_5_tokenizer)
    with torch.no_grad():
        before = model(**batch).logits
        handle = install(model)
        after = model(**batch).logits
        handle.remove()
    assert torch.equal(before, after)


def test_install_once_remove_and_refuse_a_cache(packed, tiny_qwen3_5_tokenizer):

    sequences, collate = packed
    model = tiny_qwen3_5(tiny_qwen3_5_tokenizer, moe=True)
    layers = linear_attention_layers(model)
    assert len(layers) == 1 and type(layers[0].linear_attn).__name__ == "Qwen3_5MoeGatedDeltaNet"
    first, second = install(model), install(model)
    assert installed(model) and first.modules == layers and not second.modules
    with pytest.raises(ValueError, match="use_cache=False"), torch.no_grad():
        model(**{**collate(sequences), "use_cache": True})
    first.remove()
    assert (
        not installed(model) and "forward" not in layers[0].__dict__ and "forward" not in layers[0].linear_attn.__dict__
    )


def test_per_sample_linear_attention_survives_a_kernel_mapping(packed, tiny_qwen3_5_tokenizer, tmp_path):
    """transformers 5.25 maps the Gated DeltaNet module to hub kernels again at every ``train()`` / ``eval()`` of a
    loaded model, dropping a forward set on it (``kernels``' ``_replace_forward``): the layer puts the per-sample
    forward back, around the one the mapping chose."""
    sequences, collate = packed
    batch = collate(sequences)
    tiny_qwen3_5(tiny_qwen3_5_tokenizer).save_pretrained(tmp_path / "model")
    model = load_model(str(tmp_path / "model")).eval()
    with torch.no_grad():
        alone = [float(model(**collate([s])).loss) for *_, s in spans(sequences)]
        handle = install(model)
        model.train()
        model.eval()
        attention = linear_attention_layers(model)[0].linear_attn
        attention.__dict__.pop("forward", None)  # what the mapping does where it keeps the module's own class
        packed_losses = per_sample_losses(model(**batch).logits, batch["labels"], sequences)
        assert "forward" in attention.__dict__  # put back
        handle.remove()
    assert "forward" not in attention.__dict__
    assert packed_losses == pytest.approx(alone, abs=1e-5)


def test_sample_starts_from_cu_seq_lens_or_positions():

    assert sample_starts(2, 10, cu_seq_lens=torch.tensor([0, 4, 7, 10, 16, 20])) == [[0, 4, 7], [0, 6]]
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 7, 0, 1, 2, 3, 4]])
    assert sample_starts(2, 8, position_ids=positions) == [[0, 3, 5], [0, 3]]
    assert sample_starts(2, 8) == [[0], [0]]
    assert cu_seq_lens([[0, 3, 5], [0, 3]], 8).tolist() == [0, 3, 5, 8, 11, 16]
    with pytest.raises(ValueError, match="not at the batch"):
        sample_starts(2, 10, cu_seq_lens=torch.tensor([0, 4, 12]))


def test_prepare_packing_installs_where_it_can_and_refuses_where_it_cannot(tiny_qwen3_5_tokenizer):
    model = tiny_qwen3_5(tiny_qwen3_5_tokenizer, moe=True)
    prepare_packing(model).remove()  # Qwen3.5-MoE: its one Gated DeltaNet layer runs per sample
    # a model without linear attention (Qwen3-VL) needs nothing
    from transformers import Qwen3VLForConditionalGeneration

    from shardkit.testing import tiny_qwen3_vl_config

    assert not prepare_packing(Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config())).modules
    # a linear-attention layer built otherwise (no linear_attn module): its state would cross samples
    layer = linear_attention_layers(model)[0]
    layer.mixer = layer.linear_attn
    del layer.linear_attn
    with pytest.raises(ConfigError, match="declares 1 linear-attention layers and shardkit finds 0") as info:
        prepare_packing(model)
    assert "train without --pack" in str(info.value)


# --- training through shardkit train --------------------------------------------------------


@pytest.fixture(scope="module")
def memorisable_qwen3_5(make_build, memorisable_data, tiny_qwen3_5_tokenizer) -> str:
    """``memorisable``'s 8 short cases, one 64x64 image each (4 image tokens), in Tinker's qwen3_5 format."""
    return make_build(memorisable_data.jsonl, model="qwen3_5", min_pixels=32 * 32, max_pixels=64 * 64,
                      samples_per_shard=4, tokenizer=tiny_qwen3_5_tokenizer)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_qwen3_5_tokenizer) -> dict[str, str]:
    """Tiny random Qwen3.5 and Qwen3.5-MoE checkpoints, saved as a model folder is."""
    return saved_checkpoints(tmp_path_factory, "tiny-qwen3_5", lambda moe: tiny_qwen3_5(tiny_qwen3_5_tokenizer, moe))


@pytest.mark.slow
def test_full_fine_tune_of_qwen3_5_moe_learns(tmp_path, memorisable_qwen3_5, checkpoints):
    from transformers import Qwen3_5MoeForConditionalGeneration

    _, history = run(tmp_path, memorisable_qwen3_5, checkpoints["moe"], max_steps=16)
    assert falls(history), [h["loss"] for h in history]
    final = Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    assert final.config.text_config.layer_types == ["linear_attention", "full_attention"]


@pytest.mark.slow
def test_lora_on_qwen3_5_moe_adapts_the_linear_attention_and_the_shared_expert_and_learns(
    tmp_path, memorisable_qwen3_5, checkpoints
):
    from safetensors import safe_open

    _, history = run(tmp_path, memorisable_qwen3_5, checkpoints["moe"], max_steps=20, lr=2e-2, lora_rank=16)
    assert falls(history), [h["loss"] for h in history]
    final = tmp_path / "run" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["target_modules"] == LORA_TARGETS
    with safe_open(final / "adapter_model.safetensors", "pt") as f:
        adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in f.keys()}
        assert not any("visual" in name or ".experts." in name for name in f.keys())  # routed experts: 3-D
    linear_attention = {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"}
    assert adapted == linear_attention | {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
def test_qwen3_5_resumes_with_the_same_losses(tmp_path, memorisable_qwen3_5, checkpoints):
    assert_resumes_with_the_same_losses(tmp_path, memorisable_qwen3_5, checkpoints["dense"])


@pytest.mark.slow
def test_qwen3_5_moe_packed_under_torchrun_resumes(tmp_path, memorisable_qwen3_5, checkpoints):
    assert_packed_torchrun_resumes(tmp_path, memorisable_qwen3_5, checkpoints["moe"])


@pytest.mark.slow
def test_packed_steps_give_the_loss_of_one_batch_only_with_per_sample_linear_attention(
    tmp_path, memorisable_qwen3_5, checkpoints
):
    model = checkpoints["dense"]
    whole, packed = assert_accumulated_and_packed_steps_give_the_loss_of_one_batch(tmp_path, memorisable_qwen3_5, model)
    # the control: packed without the wrapper, each sample after the first of its row sees its predecessors' state
    # (transformers after 5.5 refuses the boundaries on its torch path itself)
    with mock.patch("shardkit.train.local.prepare_packing", lambda model: None):
        try:
            _, leaky = run(tmp_path, memorisable_qwen3_5, model, name="leaky", max_steps=1, batch_size=None,
                           batch_tokens=512, pack=True, grad_accum=8)  # fmt: skip
        except ValueError as error:
            assert "packed" in str(error)
        else:
            assert abs(leaky[0]["loss"] - whole) > 1e-4 * whole


@pytest.mark.slow
def test_a_packed_run_of_a_model_it_cannot_serve_is_refused(tmp_path, memorisable_qwen3_5, checkpoints, capsys):
    args = ["train", "--data", memorisable_qwen3_5, "--model", checkpoints["dense"], "--output", str(tmp_path / "o"),
            "--max-steps", "1", "--num-workers", "0", "--batch-tokens", "512"]  # fmt: skip
    with mock.patch("shardkit.model.packing.linear_attention_layers", return_value=[]):
        assert main([*args, "--pack"]) == 2
        assert "shardkit finds 0 it can run one sample at a time" in capsys.readouterr().err
        assert main(args) == 0  # unpacked (padded rows), the same model trains


# --- the frozen tower's embedding cache ---------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_the_language_model_receives_the_towers_output_and_nothing_else(memorisable_qwen3_5, checkpoints, moe):
    """No deepstack: the vision tower's merged output (``pooler_output``, what ``shardkit embed`` caches) is all
    that enters the language model, at the image pads of ``inputs_embeds``; the tower's per-layer features do not
    reach it."""
    model = load_model(checkpoints["moe" if moe else "dense"]).eval()
    stream = ShardStream(memorisable_qwen3_5, batch_size=4, shuffle=False)
    collate = Collator.for_build(stream.source.manifest)
    batch = collate(next(iter(stream)))
    visual = vision_tower(model)
    output = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    assert getattr(output, "deepstack_features", None) is None and not hasattr(visual, "deepstack_merger_list")
    features = image_features(visual, batch["pixel_values"], batch["image_grid_thw"])
    assert all(set(f) == {"embeds"} for f in features)
    received = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: received.update(kwargs), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    hook.remove()
    at_pads = received["inputs_embeds"][batch["input_ids"] == collate.image_token_id]
    assert torch.equal(at_pads, torch.cat([f["embeds"] for f in features]))
    tensors = {key for key, value in received.items() if isinstance(value, torch.Tensor)}
    assert tensors <= {"inputs_embeds", "position_ids", "attention_mask", "cache_position"}


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, memorisable_qwen3_5, checkpoints) -> str:
    """float32 embeddings of ``memorisable_qwen3_5`` by the dense checkpoint's vision tower."""
    out = tmp_path_factory.mktemp("qwen3_5-cache") / "emb"
    config = EmbedConfig.create(build=memorisable_qwen3_5, model=checkpoints["dense"], out=str(out), dtype="float32")
    embed(config, progress=False)
    return str(out)


@pytest.mark.parametrize("batching", [{"batch_size": 3}, {"pack_tokens": 400, "sequences_per_batch": 2}])
def test_cached_embeddings_give_the_live_loss_and_gradients(memorisable_qwen3_5, checkpoints, embeddings, batching):
    model = load_model(checkpoints["dense"])
    with per_sample_linear_attention(model):
        assert_cached_gives_the_live_loss_and_gradients(model, memorisable_qwen3_5, embeddings, batching)


@pytest.mark.slow
def test_training_from_the_cache_gives_the_live_losses(tmp_path, memorisable_qwen3_5, checkpoints, embeddings):
    common = ["train", "--data", memorisable_qwen3_5, "--model", checkpoints["dense"], "--max-steps", "3", "--pack",
              "--batch-tokens", "400", "--lr", "1e-2", "--num-workers", "0", "--freeze-vision-tower"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "live")]) == 0
    assert main([*common, "--image-embeddings", embeddings, "--output", str(tmp_path / "cached")]) == 0
    live, cached = ([row["loss"] for row in metrics(tmp_path / name)] for name in ("live", "cached"))
    assert len(live) == 3 and cached == pytest.approx(live, rel=1e-4)
