"""Out-of-fold teacher logits (`teacher.folds = K > 1`): each training image's logits from the one of K fold
teachers that never saw it."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh

from debkd_jax import data as data_lib
from debkd_jax import workdir_lib
from debkd_jax.errors import UserError
from debkd_jax.pipeline.identity import fingerprint
from debkd_jax.pipeline.teacher_training import cached_logits, train_teacher

log = logging.getLogger("debkd_jax")


def check_folds(config, dataset) -> None:
    """`teacher.folds = K` needs each class's training images spread over K folds: `UserError` when a class
    has fewer than K (checked before anything is written)."""
    k = config.teacher.get("folds", 1)
    counts = np.bincount(dataset.train_labels, minlength=dataset.num_classes)
    if k > 1 and k > counts.min():
        smallest = int(np.argmin(counts))
        raise UserError(
            f"teacher.folds={k} is more than the {counts[smallest]} training images of class "
            f"{dataset.class_names[smallest]!r}: every fold needs each class; use teacher.folds <= "
            f"{counts[smallest]}."
        )


def out_of_fold_logits(config, dataset, teacher_dir: str, mesh: Mesh) -> tuple[np.ndarray, dict]:
    """`teacher.folds = K > 1`: (each training image's logits (N, k) from the teacher of its fold, which was
    trained on the other K - 1 folds and never saw it; what was done).

    The folds are `data.stratified_folds(train labels, K, config.seed)`. Teacher k trains (or is reused, or
    resumes) in `teacher_dir/folds-K/fold-k`, with the teacher config and checkpoint selection on the
    validation split; `folds-K/out_of_fold.npz` records every image's id, fold and logits.
    """
    num_folds = config.teacher.folds
    folds = data_lib.stratified_folds(dataset.train_labels, num_folds, config.seed)
    root = os.path.join(teacher_dir, f"folds-{num_folds}")
    fold_config = copy.deepcopy(config)
    fold_config.teacher.checkpoint = ""  # fold teachers always train here
    logits = np.zeros((len(folds), dataset.num_classes), np.float32)
    done = []
    log.info(
        "teacher: %d folds, so %d fold teachers (each on %d-%d training images) besides the teacher trained on all "
        "%d: %d teacher trainings in all",
        num_folds,
        num_folds,
        len(folds) - np.bincount(folds).max(),
        len(folds) - np.bincount(folds).min(),
        len(folds),
        num_folds + 1,
    )
    for k in range(num_folds):
        held = folds == k
        kept = ~held
        subset = dataclasses.replace(
            dataset,
            train_images=dataset.train_images[kept],
            train_labels=dataset.train_labels[kept],
            train_ids=None if dataset.train_ids is None else dataset.train_ids[kept],
        )
        run_dir = os.path.join(root, f"fold-{k}")
        variables, meta = train_teacher(
            config=fold_config, dataset=subset, run_dir=run_dir, mesh=mesh, fold=(k, num_folds)
        )
        heldout = dataset.train_images[held]
        key = fingerprint(*jax.tree.leaves(jax.tree.map(np.asarray, variables)), heldout)
        logits[held] = cached_logits(
            config=config,
            variables=variables,
            model_name=meta["model"],
            num_classes=dataset.num_classes,
            images={"heldout": heldout},
            path=os.path.join(run_dir, "heldout_logits.npz"),
            key=key,
            mesh=mesh,
            label=f"teacher of fold {k + 1}/{num_folds}",
        )["heldout"]
        done.append(
            {
                "fold": k,
                "train_images": int(kept.sum()),
                "heldout_images": int(held.sum()),
                "heldout_accuracy": float(np.mean(np.argmax(logits[held], -1) == dataset.train_labels[held])),
                "best_epoch": meta.get("best_epoch"),
                "wall_seconds": meta.get("wall_seconds"),
            }
        )
    if jax.process_index() == 0:
        record = {"fold": folds, "logits": logits, "labels": dataset.train_labels}
        if dataset.train_ids is not None:
            record["ids"] = dataset.train_ids
        workdir_lib.write_npz(os.path.join(root, "out_of_fold.npz"), **record)
    return logits, {
        "folds": num_folds,
        "seed": config.seed,
        "teacher_trainings": num_folds + 1,
        "fold_teachers": done,
    }


def with_out_of_fold_logits(
    *, config, dataset, t_logits: dict, teacher_meta: dict, teacher_dir: str, mesh: Mesh | None
) -> tuple[dict, dict]:
    """(t_logits, teacher_meta) as they are for `teacher.folds = 1`; for K > 1 the training split's logits
    replaced by `out_of_fold_logits`, and `teacher_meta["out_of_fold"]` saying what was done (with the
    teacher's own training accuracy, `train_accuracy_own`)."""
    if config.teacher.get("folds", 1) == 1:
        return t_logits, teacher_meta
    logits, info = out_of_fold_logits(config, dataset, teacher_dir, mesh)
    info["train_accuracy_own"] = float(np.mean(np.argmax(t_logits["train"], -1) == dataset.train_labels))
    return {**t_logits, "train": logits}, {**teacher_meta, "out_of_fold": info}
