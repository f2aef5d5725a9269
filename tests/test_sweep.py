"""Tests of the sweep runner (`debkd_jax.sweep`, configs/sweep_*.py): its points, its table and plot, and a
tiny sweep end to end -- one teacher, one student per value and seed, finished points reused by a re-run
through the command line."""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from debkd_jax import config_lib, data, methods, pipeline, processes, report, sweep
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
        name="digits",
        class_names=("0-4", "5-9"),
        splits={
            s: types.SimpleNamespace(labels=np.zeros(n, np.int32))
            for s, n in (("train", 7), ("val", 1), ("test", 2))
        },
        num_classes=2,
        skipped=(),
    )
    results = report.sweep_summary(
        config=config,
        points=points,
        runs=runs,
        source=dataset,
        teacher_meta={"model": "resnet8x4"},
        teacher_test={"accuracy": 0.95},
    )
    assert results["chosen"] == "1/12"
    row = results["points"][0]
    assert row["values"] == {"num_regions": 8} and row["seeds"] == [0, 1]
    np.testing.assert_allclose(
        [row["test"]["accuracy"]["mean"], row["test"]["accuracy"]["std"]], [0.85, 0.05]
    )
    table = report.sweep_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| num_regions | accuracy |") and len(lines) == 4
    assert "| 1/8 | 85.00 ± 5.00 |" in lines[2] and lines[3].startswith("| 1/12 (chosen) | 70.00 ± 0.00 |")
    report.write_sweep_results(str(tmp_path), "sweep-test", results)
    assert json.loads((tmp_path / "sweep-test.json").read_text())["chosen"] == "1/12"
    assert table in (tmp_path / "sweep-test.md").read_text()
    assert (tmp_path / "sweep-test.png").stat().st_size > 1000
    # Several fields: a categorical axis.
    both = _config("beta,temperature", ((0.1, 2.0), (0.2, 4.0)))
    results = report.sweep_summary(
        config=both,
        points=sweep.sweep_points(both),
        runs={
            "beta=0.1, temperature=2.0": [_fake_run(0, 0.8, 0.8)],
            "beta=0.2, temperature=4.0": [_fake_run(0, 0.7, 0.7)],
        },
        source=dataset,
        teacher_meta={"model": "resnet8x4"},
        teacher_test={"accuracy": 0.95},
    )
    assert results["sweep"]["fields"] == ["beta", "temperature"]
    report.plot_sweep(results, str(tmp_path / "both.png"))
    assert (
        tmp_path / "both.png"
    ).exists() and "| beta=0.1, temperature=2.0 (chosen) | 80.00 |" in report.sweep_table(results)


def test_point_folder_changes_with_what_decides_the_result(tmp_path):
    """A point's folder is named by its run identity (`pipeline.student_identity`, the one `main` uses), so it
    changes with what decides the result and with nothing else."""

    config = _config()
    point = sweep.sweep_points(config)[0]
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (6, 4, 4, 3), np.uint8), np.array([0, 1] * 3)
    dataset = data.memory_source(
        data.Dataset(images, labels, images[:2], labels[:2], images[:2], labels[:2], ("a", "b"), "x")
    )
    logits = {s: rng.normal(size=(6, 2)).astype(np.float32) for s in ("train", "val", "test")}

    def teacher_of(t_logits):
        return pipeline.Teacher(None, {}, None, pipeline.fingerprint(*t_logits.values()))

    def folder(seed=0, t_logits=logits, source=dataset):
        identity = pipeline.student_identity(
            config=config, method_cfg=point.method_cfg, seed=seed, source=source, teacher=teacher_of(t_logits)
        )
        return pipeline.run_folder(str(tmp_path), f"{point.slug}-seed{seed}", identity)

    first = folder()
    assert os.path.basename(first).startswith("num_regions_8-seed0-")
    assert folder(seed=1)[-8:] != first[-8:]
    other_images = data.memory_source(
        data.Dataset(images + 1, labels, images[:2], labels[:2], images[:2], labels[:2], ("a", "b"), "x")
    )
    assert folder(source=other_images) != first
    config.data.cache_dir = "/elsewhere"
    config.progress = False
    config.student.eval_batch_size += (
        7  # evaluation batching decides nothing (sweep.point_key used to change)
    )
    assert folder() == first
    config.student.num_epochs += 1
    assert folder() != first
    # Out-of-fold targets (teacher.folds = K > 1) are other training logits: another folder.
    assert folder(t_logits={**logits, "train": logits["train"] + 1}) not in (first, folder())


def test_a_point_folder_is_found_by_its_identity_whatever_its_name(tmp_path):
    """Folders named by an older key are reused when they were claimed with the same identity; a folder set
    aside (`<folder>.<time>`) or claimed with another identity is not."""
    identity = {"method": {"beta": 0.2}, "seed": 0}
    old = tmp_path / "beta_0.2-seed0-0ldkey00"
    old.mkdir()
    (old / "run.json").write_text(json.dumps(identity))
    assert pipeline.run_folder(str(tmp_path), "beta_0.2-seed0", identity) == str(old)
    other = {**identity, "seed": 1}
    assert pipeline.run_folder(str(tmp_path), "beta_0.2-seed0", other) == str(
        tmp_path / f"beta_0.2-seed0-{pipeline.identity_key(other)}"
    )
    aside = tmp_path / "beta_0.2-seed0-0ldkey00.20260101-000000"
    old.rename(aside)
    assert pipeline.run_folder(str(tmp_path), "beta_0.2-seed0", identity).endswith(
        pipeline.identity_key(identity)
    )


def test_runs_recorded_before_config_targets_are_reused_as_fixed_or_online(tmp_path):
    """A run recorded with the method field `online_targets` (before `config.targets`) is the same run as
    today's identity without it (False: "fixed") or with `targets="online"` (True), and no other."""
    from debkd_jax import workdir_lib

    identity = {"method": {"beta": 0.2}, "seed": 0}
    old = tmp_path / "beta_0.2-seed0-0ldkey00"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"method": {"beta": 0.2, "online_targets": False}, "seed": 0}))
    (old / "result.json").write_text("{}")
    assert pipeline.run_folder(str(tmp_path), "beta_0.2-seed0", identity) == str(old)
    workdir_lib.claim_run_dir(str(old), identity, "a student", upgrade=pipeline.recorded_student)
    assert "online_targets" in (old / "run.json").read_text()  # the record is left as it was
    with pytest.raises(UserError, match="targets: '\\(none\\)' -> 'online'"):
        workdir_lib.claim_run_dir(
            str(old), {**identity, "targets": "online"}, "a student", upgrade=pipeline.recorded_student
        )
    online = {"method": {"beta": 0.2, "online_targets": True}, "seed": 0}
    assert pipeline.recorded_student(online) == {**identity, "targets": "online"}


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
    # Each point's folder is keyed to its identity, which holds the out-of-fold targets (another folder than
    # with folds=1).
    own = np.load(workdir / "teacher" / "logits.npz")
    out_of_fold = pipeline.fingerprint(oof["logits"], own["val"], own["test"])
    assert out_of_fold != pipeline.fingerprint(own["train"], own["val"], own["test"])
    folders = [r for r in (workdir / "sweeps" / "regions-resnet_tiny").iterdir() if r.is_dir()]
    assert {r.name.rsplit("-", 1)[0] for r in folders} == {
        f"{p.slug}-seed0" for p in sweep.sweep_points(config)
    }
    for r in folders:
        identity = json.loads((r / "run.json").read_text())
        assert identity["teacher_logits"] == out_of_fold
        assert r.name.rsplit("-", 1)[1] == pipeline.identity_key(identity)


@pytest.mark.timeout(300)
def test_a_sweep_distils_from_the_stored_views(tmp_path):
    """targets="stored" with augmentation: the sweep stores the teacher's logits on every view once, and every
    point learns from them (its identity holds their key, not the image logits')."""
    config = _tiny_sweep_config()
    config.data.augment, config.data.views, config.targets = True, 2, "stored"
    workdir = tmp_path / "run"
    sweep.run_sweep(config, str(workdir))
    assert (workdir / "teacher" / "views.npz").exists()
    own = np.load(workdir / "teacher" / "logits.npz")
    image_key = pipeline.fingerprint(own["train"], own["val"], own["test"])
    folders = [r for r in (workdir / "sweeps" / "regions-resnet_tiny").iterdir() if r.is_dir()]
    assert len(folders) == len(sweep.sweep_points(config))
    for r in folders:
        identity = json.loads((r / "run.json").read_text())
        assert identity["targets"] == "stored" and identity["teacher_logits"] != image_key


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
    # Deterministic (seed 0, CPU). Measured, the same for seeds 0, 1 and 2: one epoch on 21 training images
    # per class leaves both students predicting one class, 6 of the 12 test images; one seed, so a spread of
    # 0; the validation tie goes to the first point.
    for point in results["points"]:
        assert point["seeds"] == [0] and point["test"]["accuracy"]["n"] == 1
        assert point["test"]["accuracy"]["mean"] == 0.5 and point["test"]["accuracy"]["std"] == 0.0
        assert "region_hit_rate" in point["test"]
    for ext in ("md", "json", "png"):
        assert (workdir / f"sweep-regions-resnet_tiny.{ext}").exists()
    assert results["chosen"] == "1/4"
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
    proc = processes.run(
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


@pytest.mark.timeout(300)
def test_a_sweep_takes_its_teacher_from_a_logits_file_or_from_variables(tmp_path):
    """`teacher.logits` and `teacher.variables` reach a sweep as they reach `main` (`pipeline.get_teacher`):
    nothing is trained for the teacher, and the teacher row is the given one's."""
    import hashlib

    from flax import serialization

    from debkd_jax import models, training

    config = _tiny_sweep_config()
    config.sweep.grid = (4,)
    dataset = pipeline.load_source(config, "memory")

    # A logits file for the training and validation images only: the report says the test split is missing.
    rng = np.random.default_rng(0)
    ids = np.concatenate([dataset.splits["train"].ids, dataset.splits["val"].ids])
    labels = np.concatenate([dataset.splits["train"].labels, dataset.splits["val"].labels])
    logits = rng.normal(size=(len(ids), dataset.num_classes)).astype(np.float32)
    logits[np.arange(len(ids)), labels] += 3.0
    np.savez(tmp_path / "t.npz", ids=ids, logits=logits)
    config.teacher.logits = str(tmp_path / "t.npz")
    workdir = tmp_path / "from_file"
    results = sweep.run_sweep(config, str(workdir))
    assert results["teacher"] == {"model": "logits file t.npz", "test": None}
    assert not (workdir / "teacher" / "final").exists()
    run_dir = workdir / results["points"][0]["run_dirs"][0]
    sha = hashlib.sha256((tmp_path / "t.npz").read_bytes()).hexdigest()
    assert json.loads((run_dir / "run.json").read_text())["teacher_logits_file"] == sha
    assert report.NO_TEACHER_TEST in (workdir / "sweep-regions-resnet_tiny.md").read_text()

    # The variables of a teacher network (msgpack): its logits are computed here, nothing is trained.
    config.teacher.logits = ""
    teacher = models.get_model("resnet_tiny", dataset.num_classes)
    size = config.data.image_size
    variables = teacher.init(jax.random.key(5), np.zeros((1, size, size, 3), np.float32), train=False)
    (tmp_path / "t.msgpack").write_bytes(serialization.to_bytes(variables))
    config.teacher.model = "resnet_tiny"
    config.teacher.variables = str(tmp_path / "t.msgpack")
    workdir = tmp_path / "from_variables"
    results = sweep.run_sweep(config, str(workdir))
    predict = training.make_predict_fn(teacher, np.float32)
    t_test = np.asarray(predict(variables, dataset.splits["test"].images)[0])
    expected = float(np.mean(np.argmax(t_test, -1) == dataset.splits["test"].labels))
    assert results["teacher"]["model"] == "resnet_tiny"
    assert results["teacher"]["test"]["accuracy"] == pytest.approx(expected)
    assert (workdir / "teacher" / "logits.npz").exists() and not (workdir / "teacher" / "final").exists()
    assert results["points"][0]["test"]["accuracy"]["n"] == 1


def test_a_sweep_checks_before_it_writes(tmp_path):
    """A student that cannot be built, or a teacher file that does not fit, stops a sweep before anything is
    written (as `main`): no config.json, no teacher, no point folder."""
    config = _tiny_sweep_config()
    config.student.model = "no_such_module_here:factory"
    with pytest.raises(UserError, match="student.model"):
        sweep.run_sweep(config, str(tmp_path / "a"))
    config = _tiny_sweep_config()
    (tmp_path / "t.npz").write_bytes(b"not an npz")
    config.teacher.logits = str(tmp_path / "t.npz")
    with pytest.raises(UserError, match="teacher.logits"):
        sweep.run_sweep(config, str(tmp_path / "b"))
    for workdir in (tmp_path / "a", tmp_path / "b"):
        written = [p for p in workdir.rglob("*") if p.is_file() and not p.name.startswith(".")]
        assert not written, written
