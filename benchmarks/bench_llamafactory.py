"""shardkit against LLaMA-Factory's own Qwen2-VL data pipeline, side by side in one run.

    .venv/bin/python benchmarks/bench_llamafactory.py                  # 3 rounds, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_llamafactory.py --llamafactory-python PATH --rounds 5

The data: the 24-case demo set (``shardkit demo-data --cases 24``), built once by shardkit and exported with
``shardkit export llamafactory`` (its resized images, ``<image>`` placeholders), so both read the same samples. The
tokens are checked equal first: per sample, LLaMA-Factory's ``input_ids`` (template ``qwen2_vl``) equal the build's
and its trained tokens are the build's plus, after each trained ``<|im_end|>``, the ``\\n`` its template trains.

What is timed, the same way on both sides (a worker process of each, in its own environment: shardkit's here,
LLaMA-Factory's in ``.venv-llamafactory``, since it pins its own transformers):

- shardkit: ``build()`` of the demo JSONL (its default workers: every core), ``ShardStream(batch_size=4)`` and
  ``TorchLoader`` with the build's collator (float32 ``pixel_values`` on the CPU);
- LLaMA-Factory 0.9.5: what ``run_sft`` does before the model: ``get_train_args``, ``load_tokenizer`` (the tokenizer
  and ``Qwen2VLProcessor``), ``get_template_and_fix_tokenizer`` (``qwen2_vl``), ``get_dataset`` (``overwrite_cache``:
  its preprocessing is run, not read back), then its ``SFTDataCollatorWith4DAttentionMask`` in a DataLoader of batch 4,
  as the HF Trainer makes it; ``model=None``, so its collator computes no M-RoPE positions (with a model it would,
  on the CPU, at every step: left out in its favour).

For 0 and 2 DataLoader workers: the **cold first epoch** (from the worker process's start: interpreter, imports,
preprocessing or build, one epoch; shardkit's tokenizer cache is warm, as after a user's first build), the **warm
first epoch** (the same again in that process, into a fresh folder) and the **later epochs** (their mean, epochs 2 to
``--epochs``). The sides alternate within each round; the figures are LLaMA-Factory's time over shardkit's, min and
median over the rounds. shardkit's later epochs with ``pixels="uint8"`` (batches bound for a GPU, normalised there)
are reported beside them. Targets: cold first epoch >= 1.5x, later epochs >= 3x.

Without LLaMA-Factory's environment the benchmark says how to make it and exits 0. Results:
``results/llamafactory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, WORK, spread

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
FOLDER = WORK / "llamafactory"
CASES = 24
BATCH = 4
SEED = 0
CUTOFF = 4096  # LLaMA-Factory's cutoff_len: over every sample (the build's max_length is 2048), so nothing is cut
LOADER_WORKERS = (0, 2)
SIDES = ("shardkit", "llamafactory")
TARGETS = {"cold_first_epoch": 1.5, "later_epochs": 3.0}
INSTALL = (
    "python3.11 -m venv .venv-llamafactory && "
    ".venv-llamafactory/bin/pip install --no-deps --require-hashes -r requirements/llamafactory.txt"
)


# --- the workers: each runs in its side's environment, imports only its side -----------------------------------------


def shardkit_pipeline(paths: dict, loader_workers: int, fresh: Path):
    """shardkit's build of the demo JSONL into ``fresh`` and its loader over it (float32 ``pixel_values``), and a
    maker of other loaders over the same build."""
    from shardkit.build import build
    from shardkit.config import BuildConfig
    from shardkit.load import ShardStream

    build(BuildConfig.create(input=paths["jsonl"], out=str(fresh)), progress=False)
    stream = ShardStream(str(fresh), batch_size=BATCH, seed=SEED)
    return shardkit_loader(stream, loader_workers, "float32"), lambda pixels: shardkit_loader(
        stream, loader_workers, pixels
    )


def shardkit_loader(stream, loader_workers: int, pixels: str):
    """A loader over the build of ``stream``, with ``pixels`` (float32, or the uint8 batches a GPU run gets)."""
    from shardkit.load.batch import Collator
    from shardkit.load.torch import TorchLoader

    loader = TorchLoader(
        stream, collate=Collator.for_build(stream.source.manifest, pixels=pixels), num_workers=loader_workers
    )

    def epoch(number: int) -> int:
        loader.set_epoch(number)
        return sum(1 for _ in loader)

    return epoch


def llamafactory_arguments(paths: dict, fresh: Path, loader_workers: int) -> dict:
    return {
        "model_name_or_path": paths["model"],
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": "shardkit",
        "dataset_dir": paths["data"],
        "template": "qwen2_vl",
        "cutoff_len": CUTOFF,
        "image_max_pixels": paths["max_pixels"],
        "output_dir": str(fresh),
        "overwrite_cache": True,
        "per_device_train_batch_size": BATCH,
        "dataloader_num_workers": loader_workers,
        "report_to": "none",
        "seed": SEED,
    }


def llamafactory_dataset(paths: dict, fresh: Path, loader_workers: int):
    """LLaMA-Factory's preprocessed data set, its collator and tokenizer, as ``run_sft`` makes them."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(llamafactory_arguments(paths, fresh, loader_workers))
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"]
    collator = SFTDataCollatorWith4DAttentionMask(
        template=template,
        model=None,
        pad_to_multiple_of=8,  # as run_sft, for training
        label_pad_token_id=IGNORE_INDEX,
        block_diag_attn=model_args.block_diag_attn,
        attn_implementation=None,
        compute_dtype=model_args.compute_dtype,
        **module,
    )
    return dataset, collator, module["tokenizer"]


def llamafactory_pipeline(paths: dict, loader_workers: int, fresh: Path):
    """LLaMA-Factory's preprocessing into ``fresh`` and a DataLoader as the HF Trainer makes it (random order)."""
    import torch

    dataset, collator, _ = llamafactory_dataset(paths, fresh, loader_workers)
    generator = torch.Generator().manual_seed(SEED)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=torch.utils.data.RandomSampler(dataset, generator=generator),
        collate_fn=collator,
        num_workers=loader_workers,
        prefetch_factor=2 if loader_workers else None,
    )
    return (lambda number: sum(1 for _ in loader)), None


PIPELINES = {"shardkit": shardkit_pipeline, "llamafactory": llamafactory_pipeline}


def worker(side: str, paths: dict, loader_workers: int, epochs: int, spawned: float, folder: Path) -> dict:
    """One round of one side: the cold first epoch (from ``spawned``, the parent's clock before it started this
    process), the later epochs, then a warm first epoch into a fresh folder."""
    running = time.time()  # the interpreter is up; the side's imports come with its pipeline
    pipeline = PIPELINES[side]
    epoch, other = pipeline(paths, loader_workers, folder / "cold")
    prepared = time.time()
    batches = epoch(0)
    cold = time.time() - spawned
    out = {
        "batches": batches,
        "interpreter_s": running - spawned,
        "cold_prepare_s": prepared - running,  # imports, then the build or the preprocessing
        "cold_first_epoch_s": cold,
        "later_epoch_s": later_epochs(epoch, epochs),
    }
    if other is not None:  # shardkit: the same build read as uint8 batches
        uint8 = other("uint8")
        uint8(0)
        out["later_epoch_uint8_s"] = later_epochs(uint8, epochs)
    started = time.perf_counter()
    epoch, _ = pipeline(paths, loader_workers, folder / "warm")
    out["warm_prepare_s"] = time.perf_counter() - started
    epoch(0)
    out["warm_first_epoch_s"] = time.perf_counter() - started
    return out


def later_epochs(epoch, epochs: int) -> list[float]:
    """The seconds of each of epochs 1 to ``epochs - 1`` of ``epoch`` (its first run before)."""
    seconds = []
    for number in range(1, epochs):
        started = time.perf_counter()
        epoch(number)
        seconds.append(time.perf_counter() - started)
    return seconds


def llamafactory_tokens(paths: dict, folder: Path) -> list[dict]:
    """Each preprocessed sample's ``input_ids`` and ``labels``, in data set order."""
    dataset, _, _ = llamafactory_dataset(paths, folder, 0)
    return [{"input_ids": list(row["input_ids"]), "labels": list(row["labels"])} for row in dataset]


# --- the parent: shardkit's environment ------------------------------------------------------------------------------


def find_llamafactory(given: str | None) -> tuple[str | None, str]:
    """LLaMA-Factory's python (``--llamafactory-python``, ``$LLAMAFACTORY_PYTHON`` or ``.venv-llamafactory``) and
    its version, or None and why not."""
    python = given or os.environ.get("LLAMAFACTORY_PYTHON") or str(ROOT / ".venv-llamafactory" / "bin" / "python")
    if not Path(python).exists():
        return None, f"no LLaMA-Factory environment at {python}"
    probe = "import llamafactory, transformers; print(llamafactory.__version__, transformers.__version__)"
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=side_env(), timeout=600)
    if run.returncode != 0:
        return None, f"{python} cannot import llamafactory: {run.stderr.strip().splitlines()[-1:]}"
    return python, run.stdout.strip()


def side_env() -> dict:
    """The workers' environment: HF datasets' cache in the work folder, no telemetry or version nagging."""
    env = dict(os.environ)
    env.update(
        HF_DATASETS_CACHE=str(FOLDER / "hf-datasets"),
        HF_HUB_OFFLINE="1",
        DISABLE_VERSION_CHECK="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    return env


def prepare() -> dict:
    """The demo set, its reference build, the export LLaMA-Factory reads and a model folder for its
    ``load_tokenizer`` (the offline Qwen vocabulary and a ``Qwen2VLImageProcessor`` configuration on the build's
    grid); made once, in ``benchmarks/work/llamafactory/``."""
    from shardkit.build import build
    from shardkit.config import BuildConfig
    from shardkit.export import export_llamafactory
    from shardkit.families import get_family
    from shardkit.synthetic import make_clinical_dataset
    from shardkit.tokenizer import bundled_tokenizer_dir

    family = get_family("qwen2_vl")
    paths = {
        "jsonl": str(FOLDER / "demo" / "train_structured.jsonl"),
        "build": str(FOLDER / "build"),
        "data": str(FOLDER / "llamafactory-data"),
        "model": str(FOLDER / "llamafactory-model"),
        "max_pixels": family.max_pixels,
    }
    if not (FOLDER / ".complete").exists():
        shutil.rmtree(FOLDER, ignore_errors=True)
        make_clinical_dataset(FOLDER / "demo", cases=CASES)
        build(BuildConfig.create(input=paths["jsonl"], out=paths["build"]), progress=False)
        export_llamafactory(paths["build"], paths["data"])
        model = Path(paths["model"])
        shutil.copytree(bundled_tokenizer_dir(), model)
        processor = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "image_mean": list(family.image_mean),
            "image_std": list(family.image_std),
            "min_pixels": family.min_pixels,
            "max_pixels": family.max_pixels,
            "patch_size": family.patch_size,
            "temporal_patch_size": family.temporal_patch_size,
            "merge_size": family.merge_size,
        }
        (model / "preprocessor_config.json").write_text(json.dumps(processor, indent=1) + "\n")
        (FOLDER / ".complete").write_text("")
    (FOLDER / "paths.json").write_text(json.dumps(paths))
    return paths


def run_worker(python: str, args: list[str], log: Path) -> dict:
    """Run this file as a worker with ``args`` (its output to ``log``); its JSON result."""
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    spawned = time.time()
    with log.open("w") as out:
        run = subprocess.run(
            [python, str(HERE), "--worker", *args, "--spawned", repr(spawned), "--result", str(result)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=side_env(),
            cwd=str(FOLDER),
        )
    if run.returncode != 0:
        sys.exit(f"a worker failed ({' '.join(args)}); its output: {log}\n" + log.read_text()[-3000:])
    return json.loads(result.read_text())


def check_tokens(python: str, paths: dict) -> dict:
    """LLaMA-Factory's tokens equal the build's; its trained tokens are the build's plus the ``\\n`` after each
    trained ``<|im_end|>``. Stops the benchmark if not."""
    from shardkit.load import BuildSource

    ours = sorted(BuildSource(paths["build"]).samples(), key=lambda s: s.info["line"])
    theirs = run_worker(python, ["--tokens"], FOLDER / "tokens.log")["samples"]
    if len(ours) != len(theirs):
        sys.exit(f"LLaMA-Factory has {len(theirs)} samples, the build {len(ours)}")
    im_end, newline, extra, trained = 151645, 198, 0, 0
    for sample, row in zip(ours, theirs, strict=True):
        ids = [int(i) for i in sample.input_ids]
        if row["input_ids"] != ids:
            sys.exit(f"sample {sample.key}: LLaMA-Factory's {len(row['input_ids'])} tokens differ from the build's "
                     f"{len(ids)}")  # fmt: skip
        ours_trained = {i for i, w in enumerate(sample.weights) if w > 0}
        theirs_trained = {i for i, label in enumerate(row["labels"]) if label != -100}
        more = theirs_trained - ours_trained
        if not ours_trained <= theirs_trained or any(
            ids[i] != newline or ids[i - 1] != im_end or i - 1 not in ours_trained for i in more
        ):
            sys.exit(f"sample {sample.key}: LLaMA-Factory trains other tokens than the build")
        extra += len(more)
        trained += len(ours_trained)
    return {"samples": len(ours), "tokens_equal": True, "trained_tokens": trained, "extra_trained_newlines": extra}


def summarise(rounds: list[dict]) -> dict:
    """Per loader-worker count and measure: each side's seconds, and LLaMA-Factory's over shardkit's round by round
    (min and median over the rounds)."""
    out = {}
    for workers in LOADER_WORKERS:
        runs = {side: [r[f"{side}-{workers}"] for r in rounds] for side in SIDES}

        def seconds(key: str, side: str = "shardkit", runs: dict = runs) -> list[float]:
            return [statistics.mean(r[key]) if isinstance(r[key], list) else r[key] for r in runs[side]]

        measures = {
            "cold_first_epoch": ("cold_first_epoch_s", "cold_first_epoch_s"),
            "warm_first_epoch": ("warm_first_epoch_s", "warm_first_epoch_s"),
            "later_epochs": ("later_epoch_s", "later_epoch_s"),
            "later_epochs_uint8": ("later_epoch_uint8_s", "later_epoch_s"),  # shardkit's batches for a GPU
        }
        entry = {}
        for name, (ours_key, theirs_key) in measures.items():
            ours, theirs = seconds(ours_key), seconds(theirs_key, "llamafactory")
            entry[name] = {
                "seconds": {"shardkit": spread(ours), "llamafactory": spread(theirs)},
                "ratio": spread([t / o for t, o in zip(theirs, ours, strict=True)], 2),
            }
        out[str(workers)] = entry
    return out


ROWS = {
    "cold_first_epoch": "first epoch, cold process (start-up, preprocessing or build, one epoch)",
    "warm_first_epoch": "first epoch, warm process (preprocessing or build, one epoch)",
    "later_epochs": "later epochs (float32 pixel_values on the CPU, both)",
    "later_epochs_uint8": "later epochs, shardkit's uint8 batches for a GPU",
}


def report(summary: dict) -> str:
    """The summary tables: LLaMA-Factory's time over shardkit's (> 1: shardkit is faster), then the seconds."""

    def cell(entry: dict) -> str:
        return f"{entry['min']:.2f} / {entry['median']:.2f}"

    lines = [
        "| LLaMA-Factory's time / shardkit's (min / median) | 0 loader workers | 2 loader workers |",
        "|---|---|---|",
    ]
    for key, label in ROWS.items():
        lines.append(f"| {label} | {' | '.join(cell(summary[str(w)][key]['ratio']) for w in LOADER_WORKERS)} |")
    lines += ["", "| seconds (min / median) | " + " | ".join(f"{side}, {w}" for w in LOADER_WORKERS for side in SIDES)
              + " |", "|---|---|---|---|---|"]  # fmt: skip
    for key, label in ROWS.items():
        cells = [cell(summary[str(w)][key]["seconds"][side]) for w in LOADER_WORKERS for side in SIDES]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llamafactory-python", help="LLaMA-Factory's interpreter (default: .venv-llamafactory)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs a worker runs (the first, then the later)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be 2 or more (the first, then the later ones)")
    python, version = find_llamafactory(args.llamafactory_python)
    if python is None:
        print(f"bench_llamafactory: skipped, {version}. LLaMA-Factory pins its own transformers and needs torchaudio, "
              f"so it lives in its own environment; make it with\n  {INSTALL}")  # fmt: skip
        return 0
    from common import machine

    started = time.perf_counter()
    paths = prepare()
    print(f"LLaMA-Factory {version.split()[0]} (transformers {version.split()[1]}) at {python}")
    tokens = check_tokens(python, paths)
    print(f"tokens: {tokens['samples']} samples equal; LLaMA-Factory trains {tokens['extra_trained_newlines']} more "
          f"tokens than shardkit's {tokens['trained_tokens']}: the \\n after each trained <|im_end|>")  # fmt: skip
    # the caches a user has after a first run: shardkit's tokenizer and HF datasets' JSON reading
    run_worker(sys.executable, ["--side", "shardkit", "--loader-workers", "0", "--epochs", "1"], FOLDER / "warmup.log")
    rounds = []
    for number in range(args.rounds):
        results = {}
        for workers in LOADER_WORKERS:
            for side in SIDES if number % 2 == 0 else SIDES[::-1]:
                interpreter = sys.executable if side == "shardkit" else python
                worker_args = ["--side", side, "--loader-workers", str(workers), "--epochs", str(args.epochs)]
                results[f"{side}-{workers}"] = run_worker(interpreter, worker_args, FOLDER / f"{side}-{workers}.log")
                print(f"round {number + 1}, {side}, {workers} loader workers: cold first epoch "
                      f"{results[f'{side}-{workers}']['cold_first_epoch_s']:.2f} s", flush=True)  # fmt: skip
        rounds.append(results)
    summary = summarise(rounds)
    table = report(summary)
    met = {name: summary["0"][name]["ratio"]["min"] >= target for name, target in TARGETS.items()}
    result = {
        "machine": machine(),
        "llamafactory": {"python": python, "version": version},
        "settings": {"cases": CASES, "batch_size": BATCH, "rounds": args.rounds, "epochs": args.epochs},
        "tokens": tokens,
        "summary": summary,
        "targets": {name: {"target": TARGETS[name], "met_at_0_workers_min": met[name]} for name in TARGETS},
        "rounds": rounds,
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llamafactory.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table)
    print()
    for name, target in TARGETS.items():
        print(
            f"target {name.replace('_', ' ')} >= {target}x (0 loader workers, min): {'met' if met[name] else 'NOT met'}"
        )
    print(f"written: {RESULTS / 'llamafactory.json'}")
    return 0


def worker_main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--tokens", action="store_true")
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--spawned", type=float, required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    paths = json.loads((FOLDER / "paths.json").read_text())
    scratch = FOLDER / "scratch" / f"{args.side or 'tokens'}-{args.loader_workers}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    if args.tokens:
        out = {"samples": llamafactory_tokens(paths, scratch)}
    else:
        out = worker(args.side, paths, args.loader_workers, args.epochs, args.spawned, scratch)
    Path(args.result).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main())
    sys.exit(main())
