from shardkit.build import build
from shardkit.cli import main
from shardkit.config import BuildConfig
from shardkit.stats import build_stats, format_stats


def test_stats_count_what_the_build_holds(clinical, tmp_path):
    out = tmp_path / "out"
    manifest = build(BuildConfig.create(input=str(clinical.jsonl), out=str(out)), progress=False)
    stats = build_stats(str(out), top=3)
    assert stats["samples"] == manifest.num_samples == len(clinical.good_lines)
    assert stats["rejected"] == len(clinical.bad_lines)
    assert sum(stats["images_per_sample_counts"].values()) == stats["samples"]
    assert sum(k * v for k, v in stats["images_per_sample_counts"].items()) == stats["images"]
    assert stats["tokens_per_sample"]["max"] <= 2048
    assert len(stats["top_labels"]) <= 3 and stats["top_labels"][0][1] >= stats["top_labels"][-1][1]
    assert sum(c for _, c in build_stats(str(out), top=100)["top_labels"]) == stats["samples"]
    text = format_stats(stats)
    assert "Tokens per sample" in text and "Stored image size" in text


KEYS = "case_id, confirmation, diagnosis, symptoms, used_images"


def test_a_meta_key_no_sample_has_is_said(clinical, tmp_path, capsys):
    out = tmp_path / "out"
    build(BuildConfig.create(input=str(clinical.jsonl), out=str(out)), progress=False)
    assert main(["stats", str(out), "--meta-key", "diagnosys"]) == 2
    assert capsys.readouterr().err == (
        f"shardkit: error: no sample of {out} has the meta key 'diagnosys' (their meta keys: {KEYS})\n"
    )
    assert build_stats(str(out), meta_key="age")["meta_keys"] == KEYS.split(", ")
