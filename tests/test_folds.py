"""Out-of-fold teacher targets (`teacher.folds = K`): the folds, which teacher each training image's
logits come from (recorded by a driver that wraps `training.fit` in a real CLI run), resume after a SIGKILL
among the fold teachers, reuse and refusal of finished fold teachers, `folds = 1` as the plain path, and the
errors for bad values."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_cli import (
    REPO,
    assert_clean_error,
    cli_args,
    cli_env,
    kill_when,
    results_without_times,
    run_cli,
    shared_cache_dir,
)

from debkd_jax import config_lib, models, pipeline, training, workdir_lib
from debkd_jax import data as data_lib
from debkd_jax.errors import UserError

FOLDS = 3
# configs/debkd.py:smoke (CE, KD, DeBKD; tiny models, 2 epochs) on 60 digits per class (84 training images).
FLAGS = (f"--config.teacher.folds={FOLDS}",)

# Wraps training.fit to record, for every model it trains, the ids of the training images it was given and
# the teacher logits its batches are given; then runs the CLI. Recording changes nothing the run computes.
RECORDING_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from debkd_jax import training

    record = os.environ["DEBKD_TEST_RECORD"]
    real_fit = training.fit

    def fit(*, name, source, run_dir, logits=None, **kwargs):
        tag = os.path.relpath(run_dir, os.environ["DEBKD_TEST_WORKDIR"]).replace(os.sep, "__")
        if logits is not None:
            np.save(os.path.join(os.path.dirname(record), tag + ".targets.npy"), logits.all())
        with open(record, "a") as f:
            f.write(json.dumps({"name": name, "run_dir": run_dir, "ids": source.splits["train"].ids.tolist(),
                                "targets": tag + ".targets.npy"}) + "\\n")
        return real_fit(name=name, source=source, run_dir=run_dir, logits=logits, **kwargs)

    training.fit = fit
    from debkd_jax import main

    sys.argv = ["debkd_jax.main", *sys.argv[1:]]
    main.run()
    """
)


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return shared_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def folds_run(cache_dir, tmp_path_factory):
    """One uninterrupted CLI run with teacher.folds=3, every `training.fit` call recorded."""
    root = tmp_path_factory.mktemp("folds")
    workdir, record = root / "run", root / "record" / "fits.jsonl"
    record.parent.mkdir()
    driver = root / "driver.py"
    driver.write_text(RECORDING_DRIVER)
    args = cli_args(workdir, cache_dir / "data", *FLAGS, config=str(REPO / "configs" / "debkd.py") + ":smoke")
    env = {**cli_env(cache_dir), "DEBKD_TEST_RECORD": str(record), "DEBKD_TEST_WORKDIR": str(workdir)}
    proc = run_cli(args, env, driver=str(driver))
    assert proc.returncode == 0, proc.stderr[-5000:]
    fits = [json.loads(line) for line in record.read_text().splitlines()]
    return {"workdir": workdir, "args": args, "fits": fits, "record_dir": record.parent, "proc": proc}


# ----------------------------------------------------------------------------------------------------------
# The folds.


@pytest.mark.parametrize("num_classes,per_class,k", [(2, (30, 31), 3), (3, (5, 7, 40), 5), (10, [9] * 10, 9)])
def test_stratified_folds_cover_every_example_once_and_balance_every_class(num_classes, per_class, k):
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(num_classes), per_class))
    folds = data_lib.stratified_folds(labels, k, seed=4)
    assert folds.shape == labels.shape and folds.dtype == np.int64
    assert set(np.unique(folds)) == set(range(k))
    for c in range(num_classes):
        counts = np.bincount(folds[labels == c], minlength=k)
        assert counts.max() - counts.min() <= 1, (c, counts)
    np.testing.assert_array_equal(folds, data_lib.stratified_folds(labels, k, seed=4))
    assert not np.array_equal(folds, data_lib.stratified_folds(labels, k, seed=5))


@pytest.mark.parametrize("k", [1, 0, 6])
def test_stratified_folds_refuse_too_few_or_too_many(k):
    labels = np.repeat([0, 1], [5, 9])
    with pytest.raises(ValueError, match="num_folds"):
        data_lib.stratified_folds(labels, k, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Which teacher each training image's logits come from.


@pytest.mark.slow
@pytest.mark.timeout(420)  # pays for the module's folds_run (one CLI run with 4 teachers and 3 students)
def test_every_training_image_gets_logits_from_a_teacher_that_never_saw_it(folds_run):
    workdir, fits = folds_run["workdir"], folds_run["fits"]
    oof = workdir_lib.read_npz(str(workdir / "teacher" / f"folds-{FOLDS}" / "out_of_fold.npz"))
    ids, fold_of, logits = oof["ids"].astype(str), oof["fold"], oof["logits"]
    teachers = {os.path.basename(f["run_dir"]): f for f in fits if "teacher" in f["name"]}
    assert set(teachers) == {"teacher", *(f"fold-{k}" for k in range(FOLDS))}
    assert sorted(teachers["teacher"]["ids"]) == sorted(ids)  # the full teacher saw every training image

    config = config_lib.load_config(str(REPO / "configs" / "debkd.py") + ":smoke")
    model = models.get_model(config.teacher.model, 2, config.dtype)
    for k in range(FOLDS):
        seen = set(teachers[f"fold-{k}"]["ids"])
        heldout = ids[fold_of == k]
        assert len(heldout) > 0 and seen.isdisjoint(heldout)
        assert seen | set(heldout) == set(ids)
        # The held-out rows are this fold teacher's own predictions.
        variables = workdir_lib.restore_variables(
            str(workdir / "teacher" / f"folds-{FOLDS}" / f"fold-{k}" / "final")
        )
        x = data_lib.normalize(jnp.asarray(_images_by_id(workdir, config, heldout)))
        own = np.asarray(model.apply(variables, x, train=False)[0])
        np.testing.assert_allclose(logits[fold_of == k], own, rtol=1e-4, atol=1e-4)

    # The students learned from these logits: KD's teacher logits are the out-of-fold ones, row for row.
    kd = next(f for f in fits if f["name"].startswith("KD "))
    order = {i: n for n, i in enumerate(ids)}
    targets = np.load(folds_run["record_dir"] / kd["targets"])
    np.testing.assert_array_equal(targets, logits[[order[i] for i in kd["ids"]]])

    results = json.loads((workdir / "results.json").read_text())
    info = results["teacher"]["out_of_fold"]
    assert info["folds"] == FOLDS and info["teacher_trainings"] == FOLDS + 1
    assert [f["heldout_images"] for f in info["fold_teachers"]] == [
        int(np.sum(fold_of == k)) for k in range(FOLDS)
    ]
    labels = oof["labels"]
    for f in info["fold_teachers"]:
        held = fold_of == f["fold"]
        assert f["heldout_accuracy"] == pytest.approx(np.mean(np.argmax(logits[held], -1) == labels[held]))
    # The teacher's train accuracy in the report is of the logits the students saw.
    assert results["teacher"]["accuracy"]["train"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))
    full = workdir_lib.read_npz(str(workdir / "teacher" / "logits.npz"))
    assert info["train_accuracy_own"] == pytest.approx(np.mean(np.argmax(full["train"], -1) == labels))
    assert f"{FOLDS + 1} teacher trainings" in folds_run["proc"].stderr


def _images_by_id(workdir, config, image_ids) -> np.ndarray:
    saved = json.loads((workdir / "config.json").read_text())
    config.data.source = saved["data"]["source"]
    config.data.cache_dir = saved["data"]["cache_dir"]
    train = pipeline.load_source(config, "memory").splits["train"]
    where = {i: n for n, i in enumerate(train.ids.astype(str))}
    return train.images[[where[i] for i in image_ids]]


# ----------------------------------------------------------------------------------------------------------
# Resume, reuse and refusal.


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_among_the_fold_teachers_resumes_to_the_same_results(folds_run, cache_dir, tmp_path):
    """SIGKILL as soon as the second fold teacher has committed a checkpoint, then the same command: the first
    fold teacher is reused, the second resumes, and every result equals the uninterrupted run's."""
    workdir = tmp_path / "run"
    args = [a.replace(str(folds_run["workdir"]), str(workdir)) for a in folds_run["args"]]
    env = cli_env(cache_dir)
    fold1 = workdir / "teacher" / f"folds-{FOLDS}" / "fold-1"
    returncode, err = kill_when(args, env, fold1 / "checkpoints" / "1")
    assert returncode == -signal.SIGKILL, err[-3000:]
    assert (fold1.parent / "fold-0" / "teacher.json").exists()
    assert not (fold1 / "teacher.json").exists(), "the second fold teacher finished before the kill"

    proc = run_cli(args, env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"teacher: reusing {fold1.parent / 'fold-0'}" in proc.stderr
    assert "resumed from the checkpoint of epoch" in proc.stderr
    for name in ("logits", "fold"):
        np.testing.assert_array_equal(
            workdir_lib.read_npz(str(fold1.parent / "out_of_fold.npz"))[name],
            workdir_lib.read_npz(
                str(folds_run["workdir"] / "teacher" / f"folds-{FOLDS}" / "out_of_fold.npz")
            )[name],
        )
    assert results_without_times(workdir / "results.json") == results_without_times(
        folds_run["workdir"] / "results.json"
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A config and dataset that train a fold teacher in a second or two."""
    config = config_lib.load_config(str(REPO / "configs" / "debkd.py") + ":smoke")
    config.data.max_per_class = 20
    config.data.cache_dir = str(tmp_path_factory.mktemp("data_cache"))
    config.teacher.num_epochs = 1
    config.teacher.batch_size = 8
    return config, pipeline.load_source(config, "memory")


@pytest.mark.timeout(300)
def test_finished_fold_teachers_are_reused_and_stale_ones_never(tiny, tmp_path, monkeypatch):
    config, dataset = tiny
    mesh = training.create_mesh()
    trained = []
    real_fit = training.fit

    def counting_fit(**kwargs):
        trained.append(kwargs["run_dir"])
        return real_fit(**kwargs)

    monkeypatch.setattr(training, "fit", counting_fit)
    teacher_dir = str(tmp_path / "teacher")
    config.teacher.folds = 2
    first, _, info = pipeline.out_of_fold_logits(config, dataset, teacher_dir, mesh)
    assert len(trained) == 2 and info["teacher_trainings"] == 3

    again, _, _ = pipeline.out_of_fold_logits(config, dataset, teacher_dir, mesh)  # reused, not retrained
    assert len(trained) == 2
    np.testing.assert_array_equal(first.all(), again.all())

    config.teacher.folds = 3  # another K: its own fold teachers, next to the others
    pipeline.out_of_fold_logits(config, dataset, teacher_dir, mesh)
    assert len(trained) == 5 and all("folds-3" in d for d in trained[2:])
    assert (tmp_path / "teacher" / "folds-2" / "fold-1" / "teacher.json").exists()

    saved = (tmp_path / "teacher" / "folds-2" / "fold-0" / "teacher.json").read_bytes()
    config.teacher.folds = 2
    config.seed = 1  # other folds (and other settings): the finished fold teachers must not be reused
    with pytest.raises(UserError, match="overwrite"):
        pipeline.out_of_fold_logits(config, dataset, teacher_dir, mesh)
    assert len(trained) == 5
    assert (tmp_path / "teacher" / "folds-2" / "fold-0" / "teacher.json").read_bytes() == saved
    config.seed = 0


def test_folds_one_is_the_plain_path(tiny, tmp_path, monkeypatch):
    """folds=1 gives the teacher's own logits, trains no fold teacher and writes no folds folder; the field is
    not part of any teacher's identity, so the teacher trained on all images is the same (and reused) for
    every K."""
    config, source = tiny
    model = models.get_model(config.teacher.model, source.num_classes)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(jnp.zeros((1, 32, 32, 3)))
    meta = {"model": config.teacher.model}
    config.teacher.folds = 1

    def no_folds(*args, **kwargs):
        raise AssertionError("out-of-fold logits with teacher.folds=1")

    monkeypatch.setattr("debkd_jax.pipeline.teacher.out_of_fold_logits", no_folds)
    teacher = pipeline.get_teacher(
        config=config,
        source=source,
        teacher_dir=str(tmp_path),
        mesh=training.create_mesh(),
        given=pipeline.Teacher(variables, meta, None),
    )
    assert teacher.meta is meta and not any(p.name.startswith("folds") for p in tmp_path.iterdir())

    meta = {"data": "d", "class_names": ["a", "b"], "image_size": 32}
    identities = []
    for folds in (1, 3):
        config.teacher.folds = folds
        identities.append(pipeline.teacher_identity(config, meta))
    del config.teacher["folds"]  # a config written before the field existed
    identities.append(pipeline.teacher_identity(config, meta))
    assert identities[0] == identities[1] == identities[2]
    config.teacher.folds = 1


# ----------------------------------------------------------------------------------------------------------
# Bad values.


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "3"])
def test_folds_must_be_an_integer_of_at_least_one(value):
    config = config_lib.load_config(str(REPO / "configs" / "debkd.py") + ":smoke")
    # A config built from a dict (not the typed base config) can hold any value.
    config.teacher = ml_collections.ConfigDict({**config.teacher.to_dict(), "folds": value})
    with pytest.raises(UserError, match=r"teacher\.folds=.* must be an integer >= 1"):
        config_lib.validate_config(config)


@pytest.mark.parametrize(
    "field,value,needle",
    [("logits", "/x/logits.npz", "teacher.logits"), ("variables", "/x/teacher.msgpack", "teacher.variables")],
)
def test_folds_need_a_teacher_trained_here(field, value, needle):
    config = config_lib.load_config(str(REPO / "configs" / "debkd.py") + ":smoke")
    config.teacher.folds = 3
    config.teacher[field] = value
    with pytest.raises(UserError, match=needle):
        config_lib.validate_config(config)
    config.teacher[field] = ""
    config.teacher.checkpoint = "/x/teacher"  # the full teacher from elsewhere, the fold teachers here
    config_lib.validate_config(config)


@pytest.mark.parametrize("mode", ["online", "stored"])
def test_folds_refuse_targets_from_the_views(mode):
    config = config_lib.load_config(str(REPO / "configs" / "debkd.py") + ":smoke")
    config.teacher.folds = 2
    config.targets = mode
    with pytest.raises(UserError, match=f"targets='{mode}'.*out-of-fold"):
        config_lib.validate_config(config)


@pytest.mark.timeout(120)
def test_more_folds_than_the_smallest_class_is_one_clear_error_before_any_write(cache_dir, tmp_path):
    """Digits with 5 images per class leave 3 per class for training: 4 folds cannot each hold every class."""
    workdir = tmp_path / "run"
    args = cli_args(workdir, cache_dir / "data", "--config.data.max_per_class=5", "--config.teacher.folds=4")
    proc = run_cli(args, cli_env(cache_dir))
    assert_clean_error(proc, "teacher.folds=4", "teacher.folds <= 3")
    assert not workdir.exists()  # checked before the workdir is made: no lock, no config, no teacher
