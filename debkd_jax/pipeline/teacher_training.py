"""A teacher network trained here (or reused from a finished one), and a network's logits cached on disk."""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from debkd_jax import methods, models, training, workdir_lib
from debkd_jax import targets as targets_lib
from debkd_jax.errors import UserError
from debkd_jax.pipeline.identity import fingerprint, teacher_identity

log = logging.getLogger("debkd_jax")


def placeholder_targets(n: int, k: int) -> targets_lib.Targets:
    """Targets that a plain cross-entropy objective ignores: (n, k) zeros, intervals [0, 1]."""
    z = np.zeros((n, k), np.float32)
    return targets_lib.Targets(logits=z, lo=z, hi=z + 1.0, correct=np.ones((n,), bool))


def train_teacher(
    *, config, dataset, run_dir: str, mesh: Mesh, fold: tuple[int, int] | None = None
) -> tuple[dict, dict]:
    """Trains (or reloads) the teacher; returns its eval variables and its metadata. `fold=(k, K)`: the
    teacher of fold k of K (`dataset` then holds the other folds' training images; `out_of_fold_logits`)."""
    meta = {
        "model": config.teacher.model,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "image_size": int(dataset.train_images.shape[1]),
        "data": fingerprint(dataset.train_images, dataset.train_labels),
        "dtype": config.dtype,
    }
    if fold is not None:
        meta["fold"] = {"index": fold[0], "of": fold[1], "train_images": len(dataset.train_labels)}
    final = os.path.join(run_dir, "final")
    source = workdir_lib.expand(config.teacher.checkpoint) if config.teacher.checkpoint else run_dir
    # teacher.checkpoint naming this run's own teacher folder means "train it here, or reuse it".
    trains_here = source == workdir_lib.expand(run_dir)
    if trains_here:
        # The teacher trained here: refuse to resume or reuse one trained with other settings.
        workdir_lib.claim_run_dir(
            run_dir, teacher_identity(config, meta), "a teacher", jax.process_index() == 0, config.overwrite
        )
        training.sync_processes("claim " + run_dir)
    saved = workdir_lib.read_json(os.path.join(source, "teacher.json"))
    if saved is not None:
        workdir_lib.check_teacher_matches(saved, meta, source)
        variables = workdir_lib.restore_variables(os.path.join(source, "final"))
        log.info("teacher: reusing %s (%s)", source, saved["model"])
        if source != run_dir and jax.process_index() == 0:
            os.makedirs(run_dir, exist_ok=True)
        return variables, saved
    if not trains_here:
        raise UserError(
            f"teacher.checkpoint={config.teacher.checkpoint!r} holds no finished teacher (no teacher.json); "
            "point it at the 'teacher' folder of a finished run, or leave it empty to train one."
        )
    objective = methods.objective(methods.preset("CE"), config.teacher.num_epochs)
    steps = len(dataset.train_labels) // config.teacher.batch_size
    spec = training.build_step_spec(
        config.teacher,
        dataset.num_classes,
        config.dtype,
        objective,
        steps,
        config.data.augment,
        training.resolve_conv_backward(config.get("conv_backward", "auto"), mesh, config.dtype),
    )
    dummy = placeholder_targets(len(dataset.train_labels), dataset.num_classes)
    started = time.perf_counter()
    result = training.fit(
        name="teacher" if fold is None else f"teacher of fold {fold[0] + 1}/{fold[1]}",
        spec=spec,
        train_cfg=config.teacher,
        dataset=dataset,
        train_targets=dummy,
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


def teacher_logits(
    *, config, variables, meta: dict, dataset, teacher_dir: str, mesh: Mesh
) -> dict[str, np.ndarray]:
    """The teacher's eval-mode logits on every split, cached beside its checkpoint (keyed to it and the data)."""
    key = fingerprint(
        *jax.tree.leaves(jax.tree.map(np.asarray, variables)), dataset.train_images, dataset.test_images
    )
    images = {split: getattr(dataset, f"{split}_images") for split in ("train", "val", "test")}
    return cached_logits(
        config=config,
        variables=variables,
        model_name=meta["model"],
        num_classes=dataset.num_classes,
        images=images,
        path=os.path.join(teacher_dir, "logits.npz"),
        key=key,
        mesh=mesh,
        label="teacher logits",
    )


def cached_logits(
    *,
    config,
    variables,
    model_name: str,
    num_classes: int,
    images: dict,
    path: str,
    key: str,
    mesh: Mesh,
    label: str,
) -> dict[str, np.ndarray]:
    """`{name: model_name's eval-mode logits (N, k) on images[name]}`, read from the .npz at `path` when its
    `key` matches, else computed (with a progress bar `label (name)`) and written there."""
    cached = workdir_lib.read_npz(path)
    if cached is not None and str(cached.get("key")) == key and all(n in cached for n in images):
        return {n: cached[n] for n in images}
    model = models.get_model(model_name, num_classes, config.dtype)
    predict = training.make_predict_fn(model, jnp.dtype(config.dtype))
    out = {
        name: training.predict_logits(
            predict,
            variables,
            x,
            config.teacher.eval_batch_size,
            mesh,
            progress=f"{label} ({name})" if config.progress else None,
        )
        for name, x in images.items()
    }
    if jax.process_index() == 0:
        workdir_lib.write_npz(path, key=np.asarray(key), **out)
    return out
