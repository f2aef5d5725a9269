"""The input-pipeline benchmark (benchmarks/data.py): its report shows the numbers of its JSON, and its ratio
is the ratio of the two rates it measured. No speed assertions."""

import json

import pytest

from benchmarks import data
from benchmarks.render import fmt


def test_data_benchmark_report_equals_its_json(tmp_path):
    results = data.measure_source("digits", batch_size=64, steps=2, model="resnet_tiny")
    md = data.write(results, str(tmp_path))
    saved = json.loads((tmp_path / "benchmarks_data.json").read_text())
    assert saved == results
    assert saved["images"] == 1797  # every split of the digits data set was loaded and counted
    assert saved["delivery_over_step"] == pytest.approx(
        saved["batch_delivery_images_per_s"] / saved["train_step_images_per_s"]
    )
    assert (tmp_path / "BENCHMARKS_DATA.md").read_text() == md
    for label, key in (
        ("| decode every file and write the cache |", "decode_and_cache_images_per_s"),
        ("| load the cache |", "cached_load_images_per_s"),
        (
            "| resnet_tiny DeBKD train step on those batches, targets built in the step |",
            "train_step_images_per_s",
        ),
    ):
        (line,) = [line for line in md.splitlines() if line.startswith(label)]
        assert line == f"{label} {fmt(saved[key])} |"
    assert f"rate: {saved['delivery_over_step']:.0f}x." in md
