"""A teacher network trained here on either kind of data (or reused from a finished one)."""

from __future__ import annotations

import logging
import os
import time

import jax
from jax.sharding import Mesh

from debkd_jax import methods, training, workdir_lib
from debkd_jax.data import source as source_lib
from debkd_jax.errors import UserError
from debkd_jax.pipeline.identity import teacher_identity

log = logging.getLogger("debkd_jax")


def teacher_meta(config, source: source_lib.DataSource) -> dict:
    """What a teacher trained on `source` records of itself (teacher.json, before its training history)."""
    return {
        "model": config.teacher.model,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "image_size": source.image_size,
        "data": source.fingerprint,
        "dtype": config.dtype,
    }


def check_checkpoint(config, source: source_lib.DataSource, run_dir: str) -> None:
    """`teacher.checkpoint` (a finished run's teacher folder, not this run's own): it holds a finished teacher
    of this model and data, else a one-line `UserError` before anything is written."""
    if not config.teacher.get("checkpoint", ""):
        return
    origin = workdir_lib.expand(config.teacher.checkpoint)
    if origin == workdir_lib.expand(run_dir):
        return
    saved = workdir_lib.read_json(os.path.join(origin, "teacher.json"))
    if saved is None:
        raise no_finished_teacher(config)
    workdir_lib.check_teacher_matches(saved, teacher_meta(config, source), origin)


def no_finished_teacher(config) -> UserError:
    return UserError(
        f"teacher.checkpoint={config.teacher.checkpoint!r} holds no finished teacher (no teacher.json); "
        "point it at the 'teacher' folder of a finished run, or leave it empty to train one."
    )


def train_teacher(
    *, config, source: source_lib.DataSource, run_dir: str, mesh: Mesh, fold: tuple[int, int] | None = None
) -> tuple[dict, dict]:
    """Trains (or reloads) the teacher on `source`; returns its eval variables and its metadata. A finished
    teacher in `teacher.checkpoint` (or `run_dir`) is reused. `fold=(k, K)`: the teacher of fold k of K
    (`source` then holds the other folds' training images; `folds.out_of_fold_logits`)."""
    meta = teacher_meta(config, source)
    if fold is not None:
        meta["fold"] = {"index": fold[0], "of": fold[1], "train_images": len(source.splits["train"])}
    final = os.path.join(run_dir, "final")
    origin = workdir_lib.expand(config.teacher.checkpoint) if config.teacher.checkpoint else run_dir
    # teacher.checkpoint naming this run's own teacher folder means "train it here, or reuse it".
    trains_here = workdir_lib.expand(origin) == workdir_lib.expand(run_dir)
    if trains_here:
        # The teacher trained here: refuse to resume or reuse one trained with other settings.
        workdir_lib.claim_run_dir(
            run_dir,
            teacher_identity(config, meta, source),
            "a teacher",
            jax.process_index() == 0,
            config.overwrite,
        )
        training.sync_processes("claim " + run_dir)
    saved = workdir_lib.read_json(os.path.join(origin, "teacher.json"))
    if saved is not None:
        workdir_lib.check_teacher_matches(saved, meta, origin)
        variables = workdir_lib.restore_variables(os.path.join(origin, "final"))
        log.info("teacher: reusing %s (%s)", origin, saved["model"])
        if not trains_here and jax.process_index() == 0:
            os.makedirs(run_dir, exist_ok=True)
        return variables, saved
    if not trains_here:
        raise no_finished_teacher(config)
    objective = methods.objective(methods.preset("CE"), config.teacher.num_epochs)
    steps = len(source.splits["train"]) // config.teacher.batch_size
    spec = training.build_step_spec(
        config.teacher,
        source.num_classes,
        config.dtype,
        objective,
        steps,
        source.augments_on_device,
        training.resolve_conv_backward(config.get("conv_backward", "auto"), mesh, config.dtype),
    )
    started = time.perf_counter()
    result = training.fit(
        name="teacher" if fold is None else f"teacher of fold {fold[0] + 1}/{fold[1]}",
        spec=spec,
        train_cfg=config.teacher,
        source=source,
        run_dir=run_dir,
        mesh=mesh,
        seed=config.seed,
        show_progress=config.progress,
    )
    variables = {
        "params": result.best_variables["params"]["backbone"],
        "batch_stats": result.best_variables["batch_stats"]["backbone"],
    }
    meta.update(
        best_epoch=result.best_epoch, history=result.history, wall_seconds=time.perf_counter() - started
    )
    # Every process takes part in an orbax save (it synchronises them); process 0 writes the JSON files.
    workdir_lib.save_variables(final, variables)
    if jax.process_index() == 0:
        workdir_lib.write_json(os.path.join(run_dir, "teacher.json"), meta)
    return variables, meta
