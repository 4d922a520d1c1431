"""Start-up: a command-line ``shardkit build`` of the 24-case demo against the same build in a warm process.

    .venv/bin/python benchmarks/bench_startup.py            # 5 alternating rounds, about a minute on 2 cores

Each round builds the demo set twice into fresh folders, alternating: once as ``python -m shardkit.cli build``
in a new process (interpreter, imports, the tokenizer read from the cache folder, the build) and once by
``build()`` in this process, which has built it before (imports done, tokenizer loaded). Both with the default
workers (every core) and with ``--workers 1``. The cache folder is warm, as after a user's first build. Target: the
command line within 1.5x of the warm process (min over the rounds). Results: ``results/startup.json``.

Each round also times what a new process pays before it can convert a record, in a fresh interpreter each: starting
Python, importing the third-party libraries a build uses (numpy, Pillow, pyarrow, pydantic, fsspec, tokenizers),
importing shardkit's build modules, and reading the tokenizer from the cache folder. All four hold the GIL on one
core, and every process that converts records needs all of them, so ``floor`` is the ratio a command line would have
if it paid nothing else: (warm build + those costs) / warm build; ``floor_without_shardkit_imports`` leaves out
shardkit's own imports. ``bpe_model_alone_s``: the same vocabulary's BPE model alone, made by ``tokenizers`` from
its ``vocab.json`` and ``merges.txt`` (what the tokenizer read cannot go below with that library).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time

from common import WORK, machine, save, spread

TARGET = 1.5
FOLDER = WORK / "startup"
#: run in a fresh interpreter: the seconds of each fixed cost of a new build process, as JSON
FIXED_COSTS = """
import json, time
started = time.perf_counter()
import concurrent.futures, multiprocessing, fsspec, numpy, PIL.Image, PIL.JpegImagePlugin, pyarrow.parquet, pydantic
import tokenizers, tqdm
third_party = time.perf_counter()
import shardkit.build, shardkit.cli
imported = time.perf_counter()
from shardkit.tokenizer import bundled_tokenizer_dir, load_fast_tokenizer
load_fast_tokenizer()
read = time.perf_counter()
folder = bundled_tokenizer_dir()
tokenizers.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
print(json.dumps({"third_party_imports_s": third_party - started, "shardkit_imports_s": imported - third_party,
                  "tokenizer_read_s": read - imported, "bpe_model_alone_s": time.perf_counter() - read}))
"""


def fixed_costs() -> dict[str, float]:
    """One fresh interpreter's fixed costs (:data:`FIXED_COSTS`), its start (``python -c pass``) included."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    costs = {"interpreter_s": time.perf_counter() - started}
    done = subprocess.run([sys.executable, "-c", FIXED_COSTS], check=True, capture_output=True, text=True)
    return costs | json.loads(done.stdout)


def main() -> dict:
    from shardkit.build import build
    from shardkit.config import BuildConfig
    from shardkit.synthetic import make_clinical_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = FOLDER / "demo"
    if not (data / "train_structured.jsonl").exists():
        make_clinical_dataset(data, cases=24)
    jsonl = str(data / "train_structured.jsonl")
    out = {}
    for workers in (None, 1):
        option = [] if workers is None else ["--workers", str(workers)]
        run = {} if workers is None else {"workers": workers}
        build(BuildConfig.create(input=jsonl, out=str(FOLDER / "warmup")), progress=False, overwrite=True, **run)
        cold, warm = [], []
        for number in range(args.rounds):
            for side in ("cold", "warm") if number % 2 == 0 else ("warm", "cold"):
                folder = FOLDER / side
                shutil.rmtree(folder, ignore_errors=True)
                started = time.perf_counter()
                if side == "cold":
                    command = [sys.executable, "-m", "shardkit.cli", "-q", "build", jsonl, "--out", str(folder)]
                    subprocess.run([*command, "--no-progress", *option], check=True, stdout=subprocess.DEVNULL)
                    cold.append(time.perf_counter() - started)
                else:
                    build(BuildConfig.create(input=jsonl, out=str(folder)), progress=False, **run)
                    warm.append(time.perf_counter() - started)
        name = "default_workers" if workers is None else f"workers_{workers}"
        out[name] = {
            "command_line_s": spread(cold),
            "warm_process_s": spread(warm),
            "ratio_command_line_vs_warm": round(min(cold) / min(warm), 2),
            "ratio_median": round(statistics.median(cold) / statistics.median(warm), 2),
        }
        print(f"{name}: command line {min(cold):.2f} s (median {statistics.median(cold):.2f}), warm process "
              f"{min(warm):.2f} s (median {statistics.median(warm):.2f}): {min(cold) / min(warm):.2f}x "
              f"(target <= {TARGET}x)")  # fmt: skip
    costs = [fixed_costs() for _ in range(args.rounds)]
    fixed = {name: round(min(c[name] for c in costs), 3) for name in costs[0]}
    out["bpe_model_alone_s"] = fixed.pop("bpe_model_alone_s")  # not a cost: the same vocabulary, read another way
    warm = out["default_workers"]["warm_process_s"]["min"]
    shardkit_imports = fixed["shardkit_imports_s"]
    out["fixed_costs_s"] = fixed | {"total": round(sum(fixed.values()), 3)}
    out["floor"] = round((warm + sum(fixed.values())) / warm, 2)
    out["floor_without_shardkit_imports"] = round((warm + sum(fixed.values()) - shardkit_imports) / warm, 2)
    print(
        f"fixed costs of a new process (min): {fixed}; floor {out['floor']}x, without shardkit's imports "
        f"{out['floor_without_shardkit_imports']}x"
    )
    out["ratio_command_line_vs_warm"] = out["default_workers"]["ratio_command_line_vs_warm"]  # target 10
    return out


if __name__ == "__main__":
    started = time.perf_counter()
    result = {"machine": machine(), "startup": main()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    save("startup", result)
