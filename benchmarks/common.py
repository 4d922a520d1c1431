"""Shared pieces of the benchmarks: the data set, the machine, timing, results."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"  # generated data and builds (git-ignored)
RESULTS = HERE / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    import numpy
    import PIL
    import torch
    import transformers

    try:
        import torchvision

        optional = {"torchvision": torchvision.__version__}
    except ImportError:
        optional = {}
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model or platform.processor(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "versions": {
            "pillow": PIL.__version__,
            "numpy": numpy.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **optional,
        },
    }


def seed_dataset(name: str = "seed", cases: int = 40, seed: int = 0, megapixels=(0.3, 3.0)):
    """The seed-layout data set (clinical cases, 1-6 photo-like JPEGs of 0.3-3 MP), generated once and cached."""
    from shardkit.synthetic import make_clinical_dataset

    root = WORK / f"{name}-{cases}-{seed}-{megapixels[0]}-{megapixels[1]}"
    marker = root / ".complete"
    if not marker.exists():
        dataset = make_clinical_dataset(root, cases=cases, seed=seed, megapixels=megapixels)
        marker.write_text(json.dumps({"good_lines": dataset.good_lines}))
    from shardkit.synthetic import SyntheticDataset

    return SyntheticDataset(root, root / "train_structured.jsonl", json.loads(marker.read_text())["good_lines"])


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``fn()``, in seconds (the least disturbed by a noisy machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def spread(values: list[float], digits: int = 3) -> dict:
    """The min and the median of ``values``, rounded."""
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(name: str, result: dict) -> Path:
    """Write ``results/NAME.json`` (the latest run) and print it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
