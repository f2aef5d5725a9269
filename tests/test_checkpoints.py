"""Checkpoints: orbax keeps the newest (to resume) and the best on validation accuracy (earliest of equal
ones), and `fit` returns the best epoch's variables from them, also after an interrupted and resumed run."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import synthetic_dataset, teacher_spec

from debkd_jax import data, training, workdir_lib


def test_manager_keeps_the_newest_and_the_earliest_best(tmp_path):
    accuracies = [0.5, 0.75, 0.75, 0.5, 0.625]
    directory = str(tmp_path / "checkpoints")
    with workdir_lib.checkpoint_manager(directory) as manager:
        for epoch, acc in enumerate(accuracies, start=1):
            manager.save(
                epoch,
                args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.full(3, epoch, np.float32)})),
                metrics={"epoch": epoch, "val_accuracy": acc},
            )
            manager.wait_until_finished()
            assert manager.latest_step() == epoch
        assert manager.all_steps() == [2, 5] and manager.best_step() == 2
    with workdir_lib.checkpoint_manager(directory) as manager:  # as on a resume: read back from disk
        assert (manager.all_steps(), manager.best_step(), manager.latest_step()) == ([2, 5], 2, 5)
        restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        np.testing.assert_array_equal(restored["state"]["w"], np.full(3, 2, np.float32))


class _Stop(Exception):
    pass


def _fit(dataset, cfg, spec, run_dir, on_epoch=None):
    return training.fit(
        name="teacher",
        spec=spec,
        train_cfg=cfg,
        source=data.memory_source(dataset, augment=spec.augment),
        run_dir=str(run_dir),
        mesh=training.create_mesh(),
        seed=0,
        on_epoch=on_epoch,
        show_progress=False,
    )


def test_fit_returns_the_best_epoch_and_resumes_to_the_same_result(tmp_path):
    dataset = synthetic_dataset()
    cfg, spec = teacher_spec(dataset, epochs=4)
    whole = _fit(dataset, cfg, spec, tmp_path / "whole")

    def stop_after_epoch_2(record):
        if record["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _fit(dataset, cfg, spec, tmp_path / "resumed", on_epoch=stop_after_epoch_2)
    resumed = _fit(dataset, cfg, spec, tmp_path / "resumed")

    accuracies = [r["val_accuracy"] for r in whole.history]
    assert whole.best_epoch == int(np.argmax(accuracies)) + 1  # argmax: the first of equal maxima
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    for a, b in zip(
        jax.tree.leaves(whole.best_variables), jax.tree.leaves(resumed.best_variables), strict=True
    ):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, b)
    for run in ("whole", "resumed"):
        metrics = (tmp_path / run / "metrics.jsonl").read_bytes()
        assert metrics == (tmp_path / "whole" / "metrics.jsonl").read_bytes()
        steps = sorted(int(p.name) for p in (tmp_path / run / "checkpoints").iterdir() if p.name.isdigit())
        assert steps == sorted({whole.best_epoch, 4})
    # The returned variables are the best epoch's: they reproduce its validation accuracy.
    predict = training.make_predict_fn(spec.model, spec.dtype)
    logits = training.predict_logits(
        predict, whole.best_variables, dataset.val_images, cfg.eval_batch_size, training.create_mesh()
    )
    assert float(np.mean(np.argmax(logits, -1) == dataset.val_labels)) == accuracies[whole.best_epoch - 1]
