"""Faults and bad inputs: what the tool does with each (docs/reliability.md has the table).

Bad data goes through the real CLI (a subprocess for the run that trains, `main(argv)` in this process for
the one-line errors), in folders built from conftest's generated images; the
workdir faults (full disk, unwritable folder, busy workdir, diverged loss, damaged or stale files, changed
settings) run in-process on small synthetic data, and a real full disk (a tiny tmpfs) through the CLI where
this machine lets us mount one.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli import assert_clean_error, cli_args, cli_env, run_cli, run_main, shared_cache_dir
from test_train import synthetic_dataset, teacher_spec

from debkd_jax import config_lib, data, report, training, workdir_lib
from debkd_jax.errors import UserError

TEACHER_SMOKE = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "teacher.py") + ":smoke"


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return shared_cache_dir(tmp_path_factory)


# ----------------------------------------------------------------------------------------------------------
# Bad data, end to end through the CLI.


def _images(folder: pathlib.Path, cls: str, n: int) -> list[pathlib.Path]:
    """The first `n` images of class `cls` of an image folder (the generated one alternates JPEG and PNG)."""
    return sorted((folder / cls).iterdir())[:n]


@pytest.mark.slow
@pytest.mark.timeout(600)  # a CLI run bounded by its own 240 s timeout
def test_messy_folder_trains_and_reports_what_it_skipped(shapes_dir, cache_dir, tmp_path):
    """Valid JPEGs and PNGs and corrupt files mixed, a class folder named with a space and non-ASCII letters,
    file names likewise, a symlink loop, and classes of 40 and 12 images: the run completes, skips and lists
    the 3 bad files, and splits each class 70/10/20."""
    root = tmp_path / "photos"
    cats, other = root / "cat", root / "chien dög"
    cats.mkdir(parents=True)
    other.mkdir()
    for i, src in enumerate(_images(shapes_dir, "disc", 40)):
        shutil.copy(src, cats / f"cat {i}{src.suffix}")
    for i, src in enumerate(_images(shapes_dir, "bar", 12)):
        shutil.copy(src, other / f"photo é {i}{src.suffix}")
    assert {p.suffix for p in cats.iterdir()} == {".jpg", ".png"}
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "not an image.jpg").write_text("hello")
    (cats / "truncated.jpg").write_bytes(next(cats.glob("cat *.jpg")).read_bytes()[:200])
    (cats / "sub").mkdir()
    os.symlink(cats, cats / "sub" / "loop")  # cat/sub/loop -> cat: a cycle

    workdir = tmp_path / "run"
    args = cli_args(
        workdir,
        cache_dir / "data",
        f"--config.data.source=folder:{root}",
        "--config.teacher.num_epochs=1",
        "--config.student.num_epochs=1",
        "--config.teacher.batch_size=8",
        "--config.student.batch_size=8",
        config=TEACHER_SMOKE,  # the teacher and a CE student: one compiled step serves both
    )
    proc = run_cli(args, cli_env(cache_dir), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipped 3 unreadable file(s)" in proc.stderr and "skipped_files.csv" in proc.stderr

    results = json.loads((workdir / "results.json").read_text())
    d = results["dataset"]
    assert d["class_names"] == ["cat", "chien dög"]
    assert d["skipped_files"] == 3
    assert d["class_counts"] == {"train": [28, 9], "val": [4, 1], "test": [8, 2]}
    rows = (workdir / "skipped_files.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "path,reason" and len(rows) == 4
    assert sorted(r.split(",")[0].rsplit("/", 1)[-1] for r in rows[1:]) == [
        "empty.jpg",
        "not an image.jpg",
        "truncated.jpg",
    ]
    assert "chien dög" in (workdir / "results.md").read_text(encoding="utf-8")
    assert (workdir / "students" / "CE-seed0" / "result.json").exists()


@pytest.mark.parametrize(
    "layout, needles",
    [
        ("missing", ["does not exist"]),
        ("empty", ["no images found"]),
        ("one_class", ["only one class", "'cat'"]),
    ],
)
def test_unusable_data_folder_is_a_clear_error(layout, needles, shapes_dir, cache_dir, tmp_path):
    root = tmp_path / "photos"
    if layout != "missing":
        root.mkdir()
    if layout == "one_class":
        (root / "cat").mkdir()
        for src in _images(shapes_dir, "disc", 5):
            shutil.copy(src, root / "cat")
    args = cli_args(tmp_path / "run", cache_dir / "data", f"--config.data.source=folder:{root}")
    assert_clean_error(run_main(args), f"folder:{root}", *needles)


def _can_mount_tmpfs(path: pathlib.Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(path)], capture_output=True)
    return ok.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(600)  # a CLI run bounded by its own 240 s timeout
def test_full_disk_stops_cleanly_and_keeps_what_was_written(cache_dir, tmp_path):
    """A real full disk (a 300 KiB tmpfs): the teacher's second checkpoint does not fit. One clear error, exit
    status 2, and the files and checkpoints written before are intact. (Resuming once there is space again is
    the resume path that test_cli's kill tests exercise.)"""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        workdir = disk / "run"
        proc = run_cli(
            cli_args(workdir, cache_dir / "data", config=TEACHER_SMOKE), cli_env(cache_dir), timeout=240
        )
        assert proc.returncode == 2, proc.stderr[-4000:]
        # Orbax's and tensorstore's threads also write to stderr at exit and can share a line with ours.
        errors = [line[line.index("error: ") :] for line in proc.stderr.splitlines() if "error: " in line]
        # Which write meets the full disk depends on timing; each names the disk or the file it could not
        # write.
        assert len(errors) == 1, errors or proc.stderr[-4000:]
        assert any(w in errors[0] for w in ("the disk is full", "No space left", "cannot write")), errors
        # What was written before is intact: valid JSON, and every committed checkpoint restores.
        json.loads((workdir / "config.json").read_text())
        for path in list(workdir.rglob("metrics.jsonl")):
            [json.loads(line) for line in path.read_text().splitlines()]
        for ckpts in list(workdir.rglob("checkpoints")):
            with workdir_lib.checkpoint_manager(str(ckpts)) as manager:
                for step in manager.all_steps():
                    restored = manager.restore(step, args=ocp.args.Composite(history=ocp.args.JsonRestore()))
                    assert len(restored["history"]["epochs"]) == step
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------
# The workdir: disk errors, lock, stale and damaged files, results kept.


def test_disk_full_during_an_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    workdir_lib.write_json(str(path), {"old": 1})

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir_lib.os, "replace", full)
    with pytest.raises(UserError, match="disk is full"):
        workdir_lib.write_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"], "the temporary file was left"


def test_unwritable_workdir_is_a_clear_error(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(workdir_lib.os, "makedirs", denied)
    with pytest.raises(UserError, match="not writable"), workdir_lib.Workdir(str(tmp_path / "run")):
        pass


def test_checkpoint_write_errors_become_user_errors(tmp_path):
    full = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "x": No space left on device [os_error_code=28]'
    )
    assert "disk is full" in str(workdir_lib.write_error(full, str(tmp_path)))
    assert "not writable" in str(
        workdir_lib.write_error(PermissionError(errno.EACCES, "denied"), str(tmp_path))
    )
    bug = ValueError("tree structure mismatch")
    assert workdir_lib.write_error(bug, str(tmp_path)) is bug
    with pytest.raises(UserError, match="disk is full"), workdir_lib.user_write_errors(str(tmp_path)):
        raise full
    with pytest.raises(ValueError, match="tree structure mismatch"), workdir_lib.user_write_errors("x"):
        raise bug


def test_second_job_on_a_workdir_is_refused_until_the_first_ends(tmp_path):
    with workdir_lib.Workdir(str(tmp_path)):
        with pytest.raises(UserError, match=f"{tmp_path} is in use by a running job \\(pid {os.getpid()}"):
            with workdir_lib.Workdir(str(tmp_path)):
                pass
    with workdir_lib.Workdir(str(tmp_path)):  # released on exit (and by the kernel if the process dies)
        pass


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / "teacher").mkdir()
    stale = tmp_path / "teacher" / ".logits.npz.abc123.tmp"
    stale.write_bytes(b"partial")
    keep = tmp_path / "teacher" / "notes.tmp"
    keep.write_text("a user's file")
    with workdir_lib.Workdir(str(tmp_path)):
        pass
    assert not stale.exists() and keep.exists()


def test_damaged_cache_and_model_files(tmp_path):
    good = tmp_path / "logits.npz"
    workdir_lib.write_npz(str(good), key=np.asarray("k"), train=np.zeros((3, 2)))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:40])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    assert workdir_lib.read_npz(str(truncated)) is None and workdir_lib.read_npz(str(garbage)) is None
    assert workdir_lib.read_npz(str(tmp_path / "missing.npz")) is None
    assert set(workdir_lib.read_npz(str(good))) == {"key", "train"}
    broken = tmp_path / "final"
    broken.mkdir()
    (broken / "_METADATA").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the saved model"):
        workdir_lib.restore_variables(str(broken))


def _results(accuracy: float) -> dict:
    return {
        "dataset": {"source": "mock", "class_names": ["a", "b"], "sizes": {"train": 1, "val": 1, "test": 1}},
        "teacher": {"model": "resnet_tiny", "test": {"accuracy": 0.9}, "val_accuracy": [0.8]},
        "student_model": "resnet_tiny",
        "methods": {
            "KD": {
                "model": "resnet_tiny",
                "test": {"accuracy": {"mean": accuracy, "std": 0.0, "n": 1}},
                "val_accuracy": [[0.5, 0.6]],
            },
        },
        "selection": "best on validation",
    }


def test_results_are_never_overwritten(tmp_path):
    report.write_results(str(tmp_path), _results(0.7))
    first = (tmp_path / "results.json").read_bytes()
    report.write_results(str(tmp_path), _results(0.7))  # identical: nothing moves
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "results.json",
        "results.md",
        "test_accuracy.png",
        "val_accuracy.png",
    ]
    report.write_results(str(tmp_path), _results(0.8))  # different: the old files are kept with a timestamp
    report.write_results(str(tmp_path), _results(0.9))
    names = sorted(p.name for p in tmp_path.iterdir())
    kept = [n for n in names if n.startswith("results.") and n.endswith(".json") and n != "results.json"]
    assert len(kept) == 2, names
    assert len([n for n in names if n.startswith("val_accuracy.")]) == 3, names
    assert len([n for n in names if n.startswith("test_accuracy.")]) == 3, names
    assert first in [(tmp_path / n).read_bytes() for n in kept]
    assert (
        json.loads((tmp_path / "results.json").read_text())["methods"]["KD"]["test"]["accuracy"]["mean"]
        == 0.9
    )


def test_config_json_of_an_earlier_run_is_kept(tmp_path):
    config = config_lib.smoke(config_lib.base_config())
    with workdir_lib.Workdir(str(tmp_path)) as wd:
        wd.write_config(config)
        wd.write_config(config)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.json"]
        config.seed = 5
        wd.write_config(config)
    kept = [p for p in tmp_path.glob("config.*.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text())["seed"] == 0
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 5


def test_run_folder_with_other_settings_is_refused_or_set_aside(tmp_path):
    run = tmp_path / "students" / "KD-seed0"
    workdir_lib.claim_run_dir(str(run), {"method": {"beta": 0.2}, "seed": 0}, "a KD student")
    workdir_lib.claim_run_dir(str(run), {"method": {"beta": 0.2}, "seed": 0}, "a KD student")  # same: fine
    # Nothing saved yet (e.g. it diverged in epoch 1): the new settings simply take the folder.
    workdir_lib.claim_run_dir(str(run), {"method": {"beta": 0.3}, "seed": 0}, "a KD student")
    (run / "result.json").write_text("{}")
    with pytest.raises(UserError, match=r"method.beta: 0.3 -> 0.5.*overwrite=True"):
        workdir_lib.claim_run_dir(str(run), {"method": {"beta": 0.5}, "seed": 0}, "a KD student")
    workdir_lib.claim_run_dir(str(run), {"method": {"beta": 0.5}, "seed": 0}, "a KD student", replace=True)
    aside = [p for p in run.parent.iterdir() if p.name.startswith("KD-seed0.")]
    assert len(aside) == 1 and (aside[0] / "result.json").exists() and not (run / "result.json").exists()
    assert json.loads((run / "run.json").read_text())["method"]["beta"] == 0.5


def test_teacher_of_another_class_count_or_training_set_is_refused():
    saved = {"model": "resnet8", "num_classes": 2, "class_names": ["a", "b"], "image_size": 32, "data": "d1"}
    workdir_lib.check_teacher_matches(saved, dict(saved), "t/")
    for change, needle in (
        ({"num_classes": 10, "class_names": list("0123456789")}, "number of classes is 2"),
        ({"model": "resnet50"}, "architecture is 'resnet8'"),
        ({"image_size": 64}, "image size"),
        ({"data": "d2"}, "another training set"),
    ):
        with pytest.raises(UserError, match=needle):
            workdir_lib.check_teacher_matches(saved, {**saved, **change}, "t/")


# ----------------------------------------------------------------------------------------------------------
# A diverging loss.


def _fit(dataset, run_dir, cfg, spec):
    return training.fit(
        name="teacher",
        spec=spec,
        train_cfg=cfg,
        source=data.memory_source(dataset, augment=spec.augment),
        run_dir=str(run_dir),
        mesh=training.create_mesh(),
        seed=0,
        show_progress=False,
    )


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    dataset = synthetic_dataset()  # 64 images, batch 16: 4 steps per epoch
    cfg, spec = teacher_spec(dataset, epochs=3)
    real = spec.objective.loss_fn

    def poisoned(logits, labels, rows, hints, epoch):  # NaN from the first step of epoch 2 (step 5) on
        return jnp.where(epoch >= 1.0, jnp.nan, real(logits, labels, rows, hints, epoch))

    spec = dataclasses.replace(spec, objective=dataclasses.replace(spec.objective, loss_fn=poisoned))
    with pytest.raises(training.NonFiniteLoss) as info:
        _fit(dataset, tmp_path, cfg, spec)
    message = str(info.value)
    assert "NaN/Inf at step 5 of 12 (epoch 2)" in message and "last good checkpoint (epoch 1)" in message
    with workdir_lib.checkpoint_manager(str(tmp_path / "checkpoints")) as manager:
        assert manager.all_steps() == [1]
        restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    leaves = jax.tree.leaves(restored["state"])
    assert leaves and all(np.isfinite(leaf).all() for leaf in leaves)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1] and np.isfinite(records[0]["train_loss"])


def test_huge_learning_rate_diverges_with_a_clear_error(tmp_path):
    dataset = synthetic_dataset()
    cfg, spec = teacher_spec(dataset)
    cfg.learning_rate = 1e6
    with pytest.raises(
        training.NonFiniteLoss, match=r"NaN/Inf at step \d+ of 8 \(epoch 1\).*nothing was saved yet"
    ):
        _fit(dataset, tmp_path, cfg, spec)
    assert isinstance(training.NonFiniteLoss("x"), UserError)  # so the CLI prints it without a traceback
