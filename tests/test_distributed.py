"""Two processes on one machine (torchrun, gloo): an epoch split into disjoint, equal, complete parts."""

import json
import subprocess
from pathlib import Path

from shardkit.build import build
from shardkit.config import BuildConfig
from shardkit.synthetic import make_clinical_dataset
from tests.conftest import torchrun


def test_two_ranks_cover_an_epoch_disjointly_and_equally(tmp_path):
    data = make_clinical_dataset(tmp_path / "data", cases=44, seed=5, megapixels=(0.004, 0.02), images_per_case=(1, 2))
    out = tmp_path / "build"
    build(BuildConfig.create(input=str(data.jsonl), out=str(out), samples_per_shard=6), progress=False)
    result = subprocess.run(
        [
            *torchrun(2),
            str(Path(__file__).with_name("distributed_epoch.py")),
            str(out),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = (set(r["keys"]) for r in ranks)
    assert len(ranks[0]["keys"]) == len(a) == len(b) == 22
    assert not a & b
    assert a | b == {f"{line:010d}" for line in data.good_lines}
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["state"]["epoch"] == 1
