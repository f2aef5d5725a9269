"""The teacher, whichever way it comes: `get_teacher` gives a trained (or reused), given (variables), or
file (logits) teacher, with its logits on every split (cached), out-of-fold on the training split for
`teacher.folds = K > 1`. `main` and sweeps both take it from here."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from debkd_jax import metrics, models, teachers, workdir_lib
from debkd_jax.errors import UserError
from debkd_jax.pipeline.folds import with_out_of_fold_logits
from debkd_jax.pipeline.teacher_training import teacher_logits, train_teacher

log = logging.getLogger("debkd_jax")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher for the students.

    variables: the network's eval variables; None for a logits file.
    meta: what it is (model, classes, how it was made: teacher.json of a teacher trained here).
    logits: `{split: (N, k) float32 or None}`; None where a logits file lacks the split; None altogether for
      given variables whose logits are not computed yet (`given_teacher`).
    """

    variables: Any
    meta: dict
    logits: dict[str, np.ndarray | None] | None

    def test_metrics(self, dataset) -> dict | None:
        """`metrics.classification_metrics` of its test logits; None when a logits file lacks them."""
        if self.logits["test"] is None:
            return None
        return metrics.classification_metrics(
            self.logits["test"], dataset.test_labels, num_classes=dataset.num_classes
        )


def given_teacher(config, dataset) -> Teacher | None:
    """The teacher given by `teacher.logits` or `teacher.variables`, read and checked against the data and
    model (before anything is written); None when the teacher is to be trained here (or reused)."""
    if config.teacher.get("logits", ""):
        logits, meta = teacher_from_logits_file(config, dataset)
        return Teacher(None, meta, logits)
    if config.teacher.get("variables", ""):
        variables, meta = teacher_from_variables(config, dataset)
        return Teacher(variables, meta, None)
    return None


def get_teacher(*, config, dataset, teacher_dir: str, mesh: Mesh, given: Teacher | None = None) -> Teacher:
    """The teacher with its logits on every split: `given` (`given_teacher`) or trained in `teacher_dir` (or
    reused from there or `teacher.checkpoint`). A network's logits are cached in `teacher_dir/logits.npz`;
    with `teacher.folds = K > 1` the training split's are out-of-fold (`folds.out_of_fold_logits`)."""
    if given is not None and given.logits is not None:
        return given
    if given is not None:
        variables, meta = given.variables, given.meta
    else:
        variables, meta = train_teacher(config=config, dataset=dataset, run_dir=teacher_dir, mesh=mesh)
    logits = teacher_logits(
        config=config, variables=variables, meta=meta, dataset=dataset, teacher_dir=teacher_dir, mesh=mesh
    )
    logits, meta = with_out_of_fold_logits(
        config=config, dataset=dataset, t_logits=logits, teacher_meta=meta, teacher_dir=teacher_dir, mesh=mesh
    )
    return Teacher(variables, meta, logits)


def teacher_from_logits_file(config, dataset) -> tuple[dict[str, np.ndarray | None], dict]:
    """`teacher.logits`: (its logits per split, aligned to `dataset` by image id -- val/test None when the
    file lacks them --, the teacher's metadata with the file's sha256). `UserError` for a file that does not
    fit (`teachers.read_logits_file`, `teachers.align_logits`)."""
    path = workdir_lib.expand(config.teacher.logits)
    file = teachers.read_logits_file(path)
    t_logits = teachers.align_logits(file, dataset)
    meta = {
        "model": f"logits file {os.path.basename(path)}",
        "logits_file": path,
        "logits_sha256": file.sha256,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "splits": [s for s in SPLITS if t_logits[s] is not None],
    }
    log.info("teacher: logits from %s (splits %s)", path, ", ".join(meta["splits"]))
    return t_logits, meta


def teacher_from_variables(config, dataset) -> tuple[dict, dict]:
    """`teacher.variables` with `teacher.model`: (the variables, checked against the model on one image, the
    teacher's metadata). `UserError` for variables that are unreadable or do not fit the model."""
    path = workdir_lib.expand(config.teacher.variables)
    variables = teachers.read_variables(path)
    model = models.get_model(config.teacher.model, dataset.num_classes, config.dtype)
    x = jax.ShapeDtypeStruct((1, *dataset.train_images.shape[1:]), jnp.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - flax's shape/missing-variable errors
        raise UserError(
            f"teacher.variables={path!r} do not fit teacher.model={config.teacher.model!r} with "
            f"{dataset.num_classes} classes ({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the "
            "variables of that model."
        ) from e
    meta = {
        "model": config.teacher.model,
        "variables": path,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "image_size": int(dataset.train_images.shape[1]),
        "dtype": config.dtype,
    }
    return variables, meta
