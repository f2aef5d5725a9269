"""The input-pipeline benchmark runs end to end and writes its two files (no timing assertions)."""

import json

from debkd_jax import bench_data


def test_bench_data_writes_its_report(tmp_path):
    results = bench_data.run("digits", str(tmp_path), batch_size=64, steps=2)
    saved = json.loads((tmp_path / "benchmarks_data.json").read_text())
    for key in ("decode_and_cache_images_per_s", "cached_load_images_per_s", "batch_delivery_images_per_s",
                "train_step_images_per_s", "delivery_over_step"):
        assert saved[key] > 0 and results[key] == saved[key]
    assert saved["images"] == 1797
    assert "Batch delivery is" in (tmp_path / "BENCHMARKS_DATA.md").read_text()
