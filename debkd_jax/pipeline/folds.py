"""Out-of-fold teacher logits (`teacher.folds = K > 1`), on either kind of data: each training image's logits
from the one of K fold teachers that never saw it."""

from __future__ import annotations

import copy
import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh

from debkd_jax import data as data_lib
from debkd_jax import workdir_lib
from debkd_jax.data import logits_store
from debkd_jax.data import source as source_lib
from debkd_jax.errors import UserError
from debkd_jax.pipeline.teacher_pass import network_logits
from debkd_jax.pipeline.teacher_training import train_teacher

log = logging.getLogger("debkd_jax")


def check_folds(config, source: source_lib.DataSource) -> None:
    """`teacher.folds = K` needs each class's training images spread over K folds: `UserError` when a class
    has fewer than K (checked before anything is written)."""
    k = config.teacher.get("folds", 1)
    labels = source.splits["train"].labels
    counts = np.bincount(labels, minlength=source.num_classes)
    if k > 1 and k > counts.min():
        smallest = int(np.argmin(counts))
        raise UserError(
            f"teacher.folds={k} is more than the {counts[smallest]} training images of class "
            f"{source.class_names[smallest]!r}: every fold needs each class; use teacher.folds <= "
            f"{counts[smallest]}."
        )


def out_of_fold_logits(config, source: source_lib.DataSource, teacher_dir: str, mesh: Mesh) -> tuple:
    """`teacher.folds = K > 1`: (a store of each training image's logits, each row from the teacher of its
    fold, which was trained on the other K - 1 folds and never saw it; the key of those logits; what was
    done).

    The folds are `data.stratified_folds(train labels, K, config.seed)`. Teacher k trains (or is reused, or
    resumes) in `teacher_dir/folds-K/fold-k`, with the teacher config and checkpoint selection on the
    validation split; its logits on the images it held out are that folder's `heldout_logits` store, and
    `folds-K/out_of_fold.npz` records every image's id, fold and (for the memory kind) logits.
    """
    num_folds = config.teacher.folds
    train = source.splits["train"]
    folds = data_lib.stratified_folds(train.labels, num_folds, config.seed)
    root = os.path.join(teacher_dir, f"folds-{num_folds}")
    fold_config = copy.deepcopy(config)
    fold_config.teacher.checkpoint = ""  # fold teachers always train here
    counts = np.bincount(folds)
    log.info(
        "teacher: %d folds, so %d fold teachers (each on %d-%d training images) besides the teacher "
        "trained on "
        "all %d: %d teacher trainings in all",
        num_folds,
        num_folds,
        len(folds) - counts.max(),
        len(folds) - counts.min(),
        len(folds),
        num_folds + 1,
    )
    parts, keys, done = [], [], []
    position = np.zeros(len(folds), np.int64)
    for k in range(num_folds):
        held = np.flatnonzero(folds == k)
        kept = np.flatnonzero(folds != k)
        position[held] = np.arange(len(held))
        run_dir = os.path.join(root, f"fold-{k}")
        variables, meta = train_teacher(
            config=fold_config,
            source=source.with_train(kept),
            run_dir=run_dir,
            mesh=mesh,
            fold=(k, num_folds),
        )
        stores, key = network_logits(
            config=config,
            source=source,
            variables=variables,
            model_name=meta["model"],
            splits={"heldout": train.select(held)},
            stem=os.path.join(run_dir, "heldout_logits"),
            mesh=mesh,
            label=f"teacher of fold {k + 1}/{num_folds}",
        )
        store = stores["heldout"]
        parts.append(store)
        keys.append(key)
        accuracy = logits_store.accuracy(store, train.labels[held])
        done.append(
            {
                "fold": k,
                "train_images": int(len(kept)),
                "heldout_images": int(len(held)),
                "heldout_accuracy": accuracy,
                "best_epoch": meta.get("best_epoch"),
                "wall_seconds": meta.get("wall_seconds"),
            }
        )
    composed = logits_store.ComposedLogits(tuple(parts), folds, position)
    if source.kind == "memory":
        composed = logits_store.ArrayLogits(composed.all())
    if jax.process_index() == 0:
        record = {"fold": folds, "labels": train.labels, "ids": train.ids}
        if source.kind == "memory":
            record["logits"] = composed.all()
        workdir_lib.write_npz(os.path.join(root, "out_of_fold.npz"), **record)
    info = {
        "folds": num_folds,
        "seed": config.seed,
        "teacher_trainings": num_folds + 1,
        "fold_teachers": done,
    }
    return composed, "-".join(keys), info

