"""Tests of the sweep runner (`debkd_jax.sweep`, configs/sweep_*.py): its points, its table and plot, and a
tiny sweep end to end -- one teacher, one student per value and seed, finished points reused by a re-run
through the command line."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from debkd_jax import config_lib, methods, sweep
from debkd_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]

# The tiny sweep, as command-line overrides of configs/sweep_regions.py:digits,smoke (applied in-process
# first, then given to the CLI for the re-run on the same workdir). One seed: mean ± std over several seeds is
# tested on made-up results below, where it costs no training.
OVERRIDES = {
    "seeds": 1,
    "sweep.grid": (4, 12),
    "teacher.num_epochs": 1,
    "student.num_epochs": 1,
    "teacher.batch_size": 16,
    "student.batch_size": 16,
    "data.max_per_class": 30,
    "data.cache_dir": "",
}


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def _config(field="num_regions", grid=(8, 12), tick_format="1/{}"):
    config = config_lib.base_config(("DeBKD",))
    config.sweep = sweep.sweep_block("test", "DeBKD", field, grid, tick_format=tick_format)
    return config


def test_sweep_points():
    points = sweep.sweep_points(_config(grid=(8, 12.0, 16)))
    assert [p.label for p in points] == ["1/8", "1/12", "1/16"]
    assert [p.method_cfg.num_regions for p in points] == [8, 12, 16]
    assert all(isinstance(p.method_cfg.num_regions, int) for p in points)
    # Every other field comes from the base method.
    assert all(
        p.method_cfg.beta == 0.2 and tuple(p.method_cfg.transforms) == ("knowledge_infusion",) for p in points
    )
    beta = sweep.sweep_points(_config("beta", (0.1, 1), tick_format="{}"))
    assert [p.method_cfg.beta for p in beta] == [0.1, 1.0] and isinstance(beta[1].method_cfg.beta, float)
    both = sweep.sweep_points(_config("beta,temperature", ((0.1, 2.0), (0.2, 4.0))))
    assert [p.label for p in both] == ["beta=0.1, temperature=2.0", "beta=0.2, temperature=4.0"]
    assert (both[0].method_cfg.beta, both[0].method_cfg.temperature) == (0.1, 2.0)
    assert both[0].slug == "beta_0.1_temperature_2.0"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(field="n_regions"), "sweep.field names \\['n_regions'\\], not method fields"),
        (dict(method="KD"), "sweep.method='KD' is not a key of config.methods"),
        (dict(grid=()), "sweep.grid is empty"),
        (dict(grid=(8, 8)), "lists 8 twice"),
        (dict(grid=(0,)), "num_regions=0 must be an integer >= 1"),
        (dict(field="beta,temperature", grid=((0.1, 2.0, 3.0),)), "each value must be a tuple of 2"),
    ],
)
def test_sweep_points_reject_bad_sweeps(change, message):
    config = _config()
    for key, value in change.items():
        config.sweep[key] = value
    with pytest.raises(UserError, match=message):
        sweep.sweep_points(config)
    with pytest.raises(UserError, match="no `sweep` block"):
        sweep.sweep_points(config_lib.base_config(("DeBKD",)))


def _fake_run(seed, acc, val):
    test = {m: acc for m in ("accuracy", "precision", "recall", "f1", "agreement", "region_hit_rate")}
    history = [{"val_accuracy": val - 0.1}, {"val_accuracy": val}]
    return {"seed": seed, "test": test, "history": history, "best_epoch": 2, "run_dir": f"r{seed}"}


def test_table_json_and_plot(tmp_path):
    """Mean ± std over seeds per point; the chosen point is the best on validation, not on test."""
    import types

    config = _config(grid=(8, 12))
    points = sweep.sweep_points(config)
    runs = {
        "1/8": [_fake_run(0, 0.80, 0.70), _fake_run(1, 0.90, 0.70)],  # better on test
        "1/12": [_fake_run(0, 0.70, 0.90), _fake_run(1, 0.70, 0.90)],  # better on validation
    }
    dataset = types.SimpleNamespace(
        source="digits",
        class_names=("0-4", "5-9"),
        train_labels=np.zeros(7, np.int32),
        val_labels=np.zeros(1, np.int32),
        test_labels=np.zeros(2, np.int32),
        num_classes=2,
        skipped=(),
    )
    results = sweep.summarize(config, points, runs, dataset, {"model": "resnet8x4"}, {"accuracy": 0.95})
    assert results["chosen"] == "1/12"
    row = results["points"][0]
    assert row["values"] == {"num_regions": 8} and row["seeds"] == [0, 1]
    np.testing.assert_allclose(
        [row["test"]["accuracy"]["mean"], row["test"]["accuracy"]["std"]], [0.85, 0.05]
    )
    table = sweep.results_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| num_regions | accuracy |") and len(lines) == 4
    assert "| 1/8 | 85.00 ± 5.00 |" in lines[2] and lines[3].startswith("| 1/12 (chosen) | 70.00 ± 0.00 |")
    sweep.write_results(str(tmp_path), "sweep-test", results)
    assert json.loads((tmp_path / "sweep-test.json").read_text())["chosen"] == "1/12"
    assert table in (tmp_path / "sweep-test.md").read_text()
    assert (tmp_path / "sweep-test.png").stat().st_size > 1000
    # Several fields: a categorical axis.
    both = _config("beta,temperature", ((0.1, 2.0), (0.2, 4.0)))
    results = sweep.summarize(
        both,
        sweep.sweep_points(both),
        {
            "beta=0.1, temperature=2.0": [_fake_run(0, 0.8, 0.8)],
            "beta=0.2, temperature=4.0": [_fake_run(0, 0.7, 0.7)],
        },
        dataset,
        {"model": "resnet8x4"},
        {"accuracy": 0.95},
    )
    sweep.plot(results, str(tmp_path / "both.png"))
    assert (
        tmp_path / "both.png"
    ).exists() and "| beta=0.1, temperature=2.0 (chosen) | 80.00 |" in sweep.results_table(results)


def test_point_key_changes_with_what_decides_the_result():
    config = _config()
    point = sweep.sweep_points(config)[0]
    meta = {"model": "resnet8x4", "data": "abc", "num_classes": 2, "image_size": 32}
    key = sweep.point_key(config, point, 0, meta)
    assert sweep.point_key(config, point, 1, meta) != key
    assert sweep.point_key(config, point, 0, {**meta, "data": "abd"}) != key
    config.data.cache_dir = "/elsewhere"
    config.progress = False
    assert sweep.point_key(config, point, 0, meta) == key
    config.student.num_epochs += 1
    assert sweep.point_key(config, point, 0, meta) != key
    # Out-of-fold targets (teacher.folds = K > 1) are other targets: another key for each K.
    with_folds = [sweep.point_key(config, point, 0, {**meta, "out_of_fold": {"folds": k}}) for k in (2, 3)]
    assert len({sweep.point_key(config, point, 0, meta), *with_folds}) == 3


@pytest.mark.timeout(300)
def test_sweep_with_out_of_fold_targets(tmp_path):
    """teacher.folds=2 in a sweep: the fold teachers train once, and every point learns from their logits."""
    config = _tiny_sweep_config()
    config.teacher.folds = 2
    workdir = tmp_path / "run"
    results = sweep.run_sweep(config, str(workdir))
    oof = np.load(workdir / "teacher" / "folds-2" / "out_of_fold.npz")
    assert sorted(np.unique(oof["fold"])) == [0, 1]
    assert all((workdir / "teacher" / "folds-2" / f"fold-{k}" / "teacher.json").exists() for k in (0, 1))
    assert len(results["points"]) == 2
    # Each point's folder is keyed to the out-of-fold targets (another folder than with folds=1).
    teacher = json.loads((workdir / "teacher" / "teacher.json").read_text())
    expected = {
        f"{p.slug}-seed0-{sweep.point_key(config, p, 0, {**teacher, 'out_of_fold': {'folds': 2}})}"
        for p in sweep.sweep_points(config)
    }
    assert {r.name for r in (workdir / "sweeps" / "regions-resnet_tiny").iterdir() if r.is_dir()} == expected


def _tiny_sweep_config():
    config = config_lib.load_config_file(str(REPO / "configs" / "sweep_regions.py")).get_config(
        "digits,smoke"
    )
    for path, value in OVERRIDES.items():
        *parts, field = path.split(".")
        node = config
        for part in parts:
            node = node[part]
        node[field] = value
    return config


@pytest.mark.timeout(900)  # a sweep in-process, then the CLI (its own 300 s timeout)
def test_sweep_end_to_end_and_rerun_from_the_command_line(tmp_path):
    config = _tiny_sweep_config()
    assert config.seeds == 1 and config.data.source == "digits" and config.student.model == "resnet_tiny"
    workdir = tmp_path / "run"
    results = sweep.run_sweep(config, str(workdir))

    assert [p["label"] for p in results["points"]] == ["1/4", "1/12"]
    for point in results["points"]:
        assert point["seeds"] == [0] and point["test"]["accuracy"]["n"] == 1
        assert 0 <= point["test"]["accuracy"]["mean"] <= 1 and np.isfinite(point["test"]["accuracy"]["std"])
        assert "region_hit_rate" in point["test"]
    for ext in ("md", "json", "png"):
        assert (workdir / f"sweep-regions-resnet_tiny.{ext}").exists()
    assert results["chosen"] in ("1/4", "1/12")
    # One teacher (the workdir's teacher/, as debkd_jax.main uses) and its cached logits, one folder per run.
    assert (workdir / "teacher" / "teacher.json").exists() and (workdir / "teacher" / "logits.npz").exists()
    runs = sorted((workdir / "sweeps" / "regions-resnet_tiny").glob("num_regions_*-seed*"))
    assert [r.name.rsplit("-", 1)[0] for r in runs] == ["num_regions_12-seed0", "num_regions_4-seed0"]
    stamps = {r.name: (r / "result.json").stat().st_mtime_ns for r in runs}
    teacher_stamp = (workdir / "teacher" / "teacher.json").stat().st_mtime_ns
    with open(runs[0] / "result.json") as f:
        assert json.load(f)["config"]["num_regions"] == 12

    # The command line on the same workdir: every point is reused, nothing is trained again.
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "debkd_jax.sweep",
            "--config=configs/sweep_regions.py:digits,smoke",
            f"--workdir={workdir}",
            *flags,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| learning freedom 1/n | accuracy |" in proc.stdout
    assert "finished before, reusing" in proc.stderr and "teacher: reusing" in proc.stderr
    runs_after = sorted((workdir / "sweeps" / "regions-resnet_tiny").glob("num_regions_*-seed*"))
    assert {r.name: (r / "result.json").stat().st_mtime_ns for r in runs_after} == stamps
    assert (workdir / "teacher" / "teacher.json").stat().st_mtime_ns == teacher_stamp
    again = json.loads((workdir / "sweep-regions-resnet_tiny.json").read_text())
    assert again["points"] == json.loads(json.dumps(results["points"]))


def test_sweep_method_override_is_used(tmp_path):
    """The base method's own fields (here beta) reach every point; the swept field overrides its own."""
    config = _config()
    config.methods.DeBKD.beta = 0.35
    config.methods.DeBKD.num_regions = 99
    points = sweep.sweep_points(config)
    assert [(p.method_cfg.beta, p.method_cfg.num_regions) for p in points] == [(0.35, 8), (0.35, 12)]
    methods.validate("x", points[0].method_cfg)
