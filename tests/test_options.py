"""Every command-line option is a field of an option model, with the model's default and help, and no other."""

import argparse
import json
import subprocess
import sys
from enum import Enum
from typing import Literal, get_args, get_origin

import pytest
from annotated_types import Ge, Gt
from pydantic import BaseModel

from shardkit.cli import _BUILD_ONLY, COMMANDS, _build_config, _parser, _train_config
from shardkit.config import BuildConfig, BuildRun
from shardkit.embed import EmbedConfig
from shardkit.engines.local import available_cores
from shardkit.errors import ConfigError
from shardkit.export import ExportOptions
from shardkit.options import _without_none, add_options, flag, given, option_help
from shardkit.show import ShowOptions
from shardkit.stats import StatsOptions
from shardkit.synthetic import DemoDataOptions
from shardkit.train import DataOptions, TinkerTrainConfig, TrainConfig

# per command: the models its options come from, and the options that are the command's own (no model field)
OWN = {
    "validate": {"json"},
    "build": set(),
    "stats": {"build", "json"},
    "train": {"backend"},
    "embed": {"no_progress"},
    "verify": {"build"},
    "export": {"target", "build", "out"},
    "show": {"build", "text"},
    "demo-data": {"out"},
}


def models_of(command: str) -> list[type[BaseModel]]:
    return {
        "validate": [BuildConfig],
        "build": [BuildConfig, BuildRun],
        "stats": [DataOptions, StatsOptions],
        "train": [TrainConfig, TinkerTrainConfig],
        "embed": [EmbedConfig],
        "export": [ExportOptions],
        "show": [ShowOptions],
        "demo-data": [DemoDataOptions],
    }.get(command, [])


# the fields of each command's models that have no option, and why
NOT_OPTIONS = {
    "validate": set(_BUILD_ONLY),  # it writes nothing: what only the output depends on has no option
    "build": {"split"},  # set by the build from --val-fraction
    "stats": {"data", "eval_data", "eval_every"},  # the builds are positional; stats does not evaluate
}

# required by one train backend only: the command checks them (test_option_errors_name_the_option)
OPTIONAL_FLAGS = {("train", "model"), ("train", "base_model")}


def actions_of(command: str) -> list[argparse.Action]:
    parser = _parser(command)
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [a for a in subparsers.choices[command]._actions if not isinstance(a, argparse._HelpAction)]


def parse(argv: list[str]) -> argparse.Namespace:
    return _parser(argv[0]).parse_args(argv)


def field_of(models: list[type[BaseModel]], name: str):
    return next(m.model_fields[name] for m in models if name in m.model_fields)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_option_is_a_model_field_with_its_help_and_no_default_of_its_own(command):
    models = models_of(command)
    actions = actions_of(command)
    dests = {a.dest for a in actions}
    assert dests - OWN[command] == {n for m in models for n in m.model_fields} - NOT_OPTIONS.get(command, set())
    for action in actions:
        if action.dest in OWN[command]:
            continue
        info = field_of(models, action.dest)
        assert info.description, f"{command} {action.dest}: the model gives no description"
        assert action.help.replace("%%", "%") == option_help(info)
        if action.option_strings:
            assert action.default is argparse.SUPPRESS, f"{command} {action.option_strings}: a default of the CLI's own"
            assert action.required == (info.is_required() and (command, action.dest) not in OPTIONAL_FLAGS)
        else:
            assert info.is_required()
        kind = _without_none(info.annotation)
        if isinstance(kind, type) and issubclass(kind, Enum):
            assert action.choices == [m.value for m in kind]
        elif get_origin(kind) is Literal:
            assert action.choices == list(get_args(kind))


def test_help_shows_the_models_default():
    help_of = {a.dest: a.help for a in actions_of("build")}
    assert help_of["max_length"].endswith(f"(default: {BuildConfig.model_fields['max_length'].default})")
    assert help_of["format"].endswith("(default: tar)")
    assert help_of["workers"].endswith("(default: all cores)")
    help_of = {a.dest: a.help for a in actions_of("train")}
    assert "1e-5 full fine-tune, 1e-4 LoRA and Tinker" in help_of["lr"]
    assert help_of["warmup_ratio"].endswith(f"(default: {TrainConfig.model_fields['warmup_ratio'].default})")


def test_no_options_give_the_libraries_defaults():
    args = parse(["build", "in.jsonl", "--out", "o"])
    assert set(vars(args)) == {"command", "quiet", "input", "out"}
    config, run = _build_config(args)
    assert config == BuildConfig.create(input="in.jsonl", out="o") and run == BuildRun()
    assert run.workers == available_cores()

    args = parse(["validate", "in.jsonl"])
    assert set(vars(args)) == {"command", "quiet", "input", "json"}

    required = {"data": ["d"], "output": "o"}
    torch = _train_config(parse(["train", "--data", "d", "--model", "m", "--output", "o"]))
    assert torch == TrainConfig.create(model="m", **required)
    assert (torch.lr, torch.batch_size, torch.lora_rank, torch.warmup_ratio) == (1e-5, 1, None, 0.03)
    lora = _train_config(parse(["train", "--data", "d", "--model", "m", "--output", "o", "--lora-rank", "8"]))
    assert lora == TrainConfig.create(model="m", lora_rank=8, **required) and lora.lr == 1e-4
    tinker = _train_config(parse(["train", "--backend", "tinker", "--data", "d", "--base-model", "b", "--output", "o"]))
    assert tinker == TinkerTrainConfig.create(base_model="b", **required)
    assert (tinker.lr, tinker.batch_size, tinker.lora_rank, tinker.warmup_ratio) == (1e-4, 32, 32, 0.03)

    args = parse(["embed", "b", "--model", "m", "--out", "o"])
    assert set(vars(args)) == {"command", "quiet", "build", "model", "out", "no_progress"}

    for argv in (["stats", "b"], ["show", "b"], ["export", "llamafactory", "b", "--out", "o"], ["demo-data", "o"]):
        args = parse(argv)
        assert set(vars(args)) == {"command", "quiet", *OWN[argv[0]]}, argv
        assert all(not given(args, model) for model in models_of(argv[0]))


def test_the_options_of_stats_show_export_and_demo_data_reach_their_models():
    def options(argv, model):
        return model.create(**given(parse(argv), model))

    stats = options(["stats", "b", "--meta-key", "age", "--top", "3", "--epoch", "2", "--seed", "5"], StatsOptions)
    assert stats == StatsOptions(meta_key="age", top=3, epoch=2, seed=5)
    show = options(
        ["show", "b", "--key", "k1", "--key", "k2", "--samples", "3", "--rejects", "--out", "p.html"], ShowOptions
    )
    assert show == ShowOptions(keys=["k1", "k2"], samples=3, rejects=True, out="p.html")
    export = options(["export", "llamafactory", "b", "--out", "o", "--name", "n", "--no-progress"], ExportOptions)
    assert export == ExportOptions(name="n", progress=False)
    demo = options(
        ["demo-data", "o", "--cases", "3", "--megapixels", "0.1,0.2", "--images-per-case", "2,2"], DemoDataOptions
    )
    assert demo == DemoDataOptions(cases=3, megapixels=(0.1, 0.2), images_per_case=(2, 2))


def sample(info, action, default) -> tuple[list[str], object]:
    """Command-line words for a field's option, with a value other than ``default``, and that value."""
    kind = _without_none(info.annotation)
    if action.nargs == 0:
        return [], action.const
    if action.choices:
        value = next(c for c in reversed(action.choices) if c != default)
        return [str(value)], value
    if get_origin(kind) in (list, tuple):
        values = [0.5, 0.25] if get_args(kind)[0] is float else ["a", "b"]
        return [",".join(map(str, values))], get_origin(kind)(values)
    if kind is float:
        return ["0.5"], 0.5
    if kind is int:
        bounds = [m.ge for m in info.metadata if isinstance(m, Ge)] + [
            m.gt + 1 for m in info.metadata if isinstance(m, Gt)
        ]
        value = max([*bounds, default or 0]) + 1
        return [str(value)], value
    return [f"x-{action.dest}"], f"x-{action.dest}"


@pytest.mark.parametrize(
    "command, required, make",
    [
        ("build", ["in.jsonl", "--out", "o"], _build_config),
        ("train", ["--data", "d", "--model", "m", "--output", "o"], lambda args: (_train_config(args),)),
    ],
)
def test_each_option_reaches_its_field(command, required, make):
    models = models_of(command)
    defaults = make(parse([command, *required]))
    needs = {"pack": ["--batch-tokens", "64"], "max_pixels": ["--min-pixels", "1"]}  # what the option needs besides
    tried = 0
    for action in actions_of(command):
        if action.dest in OWN[command] or action.dest in required or not action.option_strings:
            continue
        if flag(action.dest) in required or action.dest == "base_model":  # given above; another backend's
            continue
        info = field_of(models, action.dest)
        default = next(getattr(c, action.dest) for c in defaults if action.dest in type(c).model_fields)
        words, value = sample(info, action, default)
        configs = make(parse([command, *required, action.option_strings[0], *words, *needs.get(action.dest, [])]))
        config = next(c for c in configs if action.dest in type(c).model_fields)
        assert getattr(config, action.dest) == value != default, f"{action.option_strings[0]} {words}"
        tried += 1
    assert tried >= 20


def test_option_errors_name_the_option(capsys):
    with pytest.raises(SystemExit) as exit:
        parse(["build", "in.jsonl", "--out", "o", "--max-length", "8"])
    assert exit.value.code == 2 and "argument --max-length: Input should be greater than or equal to 32" in (
        capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match="--pack: not an option of --backend tinker"):
        _train_config(
            parse(["train", "--backend", "tinker", "--data", "d", "--base-model", "b", "--output", "o", "--pack"])
        )
    with pytest.raises(ConfigError, match="--backend tinker needs --base-model"):
        _train_config(parse(["train", "--backend", "tinker", "--data", "d", "--output", "o"]))


def test_a_command_cannot_give_an_option_its_own_default_or_help():
    for keyword in ("default", "help"):
        with pytest.raises(ValueError, match="come from the model"):
            add_options(argparse.ArgumentParser(), BuildRun, ["workers"], overrides={"workers": {keyword: 4}})
    assert flag("max_image_bytes") == "--max-image-bytes"
    assert given(argparse.Namespace(workers=3, json=True), BuildRun) == {"workers": 3}


def test_the_trainers_import_no_build_code():
    code = (
        "import json, sys; import shardkit.train.local, shardkit.train.tinker, shardkit.train, shardkit.options; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = set(
        json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    )
    assert "shardkit.train.local" in loaded
    build_code = (
        "shardkit.build",
        "shardkit.config",
        "shardkit.convert",
        "shardkit.dedup",
        "shardkit.families",
        "shardkit.images",
        "shardkit.inputs",
        "shardkit.render",
    )
    assert not [m for m in loaded if m in build_code or m.startswith(tuple(f"{p}." for p in build_code))]
