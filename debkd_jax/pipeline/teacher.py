"""The one teacher path, for either kind of data: the teacher comes from a logits file (by image id), given
variables, a finished run (`teacher.checkpoint`) or training here; then one teacher pass writes its logits on
every split into the logits store of the source's kind (`teacher_pass`), out-of-fold on the training split for
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
from debkd_jax import targets as targets_lib
from debkd_jax.data import logits_store
from debkd_jax.data import source as source_lib
from debkd_jax.errors import UserError
from debkd_jax.pipeline.folds import out_of_fold_logits
from debkd_jax.pipeline.identity import fingerprint
from debkd_jax.pipeline.teacher_pass import array_logits, network_logits, view_logits
from debkd_jax.pipeline.teacher_training import train_teacher

log = logging.getLogger("debkd_jax")
SPLITS = source_lib.SPLITS


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher for the students.

    variables: the network's eval variables; None for a logits file.
    meta: what it is (model, classes, how it was made: teacher.json of a teacher trained here).
    logits: `{split: a logits store (data.logits_store) or None}`; None where a logits file lacks the split;
      None altogether for given variables whose logits are not computed yet (`given_teacher`).
    key: what identifies the logits (the students' identity holds it).
    """

    variables: Any
    meta: dict
    logits: dict | None
    key: str = ""

    def test_metrics(self, source: source_lib.DataSource) -> dict | None:
        """`metrics.classification_metrics` of its test logits (readable rows); None when a logits file lacks
        them."""
        store = self.logits["test"]
        if store is None:
            return None
        valid = store.valid
        return metrics.classification_metrics(
            store.all()[valid], source.splits["test"].labels[valid], num_classes=source.num_classes
        )


def given_teacher(config, source: source_lib.DataSource) -> Teacher | None:
    """The teacher given by `teacher.logits` or `teacher.variables`, read and checked against the data and
    model (before anything is written); None when the teacher is to be trained here (or reused)."""
    if config.teacher.get("logits", ""):
        logits, meta = teacher_from_logits_file(config, source)
        return Teacher(None, meta, logits)
    if config.teacher.get("variables", ""):
        variables, meta = teacher_from_variables(config, source)
        return Teacher(variables, meta, None)
    return None


def get_teacher(
    *, config, source: source_lib.DataSource, teacher_dir: str, mesh: Mesh, given: Teacher | None = None
) -> Teacher:
    """The teacher with its logits on every split (module docstring)."""
    if given is not None and given.logits is not None:
        stores = array_logits(
            config,
            source,
            given.logits,
            os.path.join(teacher_dir, "logits-file"),
            given.meta["logits_sha256"][:16],
        )
        return Teacher(None, given.meta, stores, _key(stores, given.meta["logits_sha256"][:16]))
    if given is not None:
        variables, meta = given.variables, given.meta
    else:
        variables, meta = train_teacher(config=config, source=source, run_dir=teacher_dir, mesh=mesh)
    stores, key = network_logits(
        config=config,
        source=source,
        variables=variables,
        model_name=meta["model"],
        splits=source.splits,
        stem=os.path.join(teacher_dir, "logits"),
        mesh=mesh,
        label="teacher logits",
    )
    record_unreadable(stores, source)
    if config.teacher.get("folds", 1) > 1:
        train, oof_key, info = out_of_fold_logits(config, source, teacher_dir, mesh)
        info["train_accuracy_own"] = logits_store.accuracy(stores["train"], source.splits["train"].labels)
        stores, key, meta = {**stores, "train": train}, f"{key}-{oof_key}", {**meta, "out_of_fold": info}
    return Teacher(variables, meta, stores, _key(stores, key))


@dataclasses.dataclass(frozen=True)
class StudentTargets:
    """Where the students' targets come from (`config.targets`): `mode`; `train`, the logits store their
    batches read (the teacher's logits of each training image, or of each view of it: `ViewLogits`), which
    knowledge infusion's table and the target diagnostics also read; `key`, what identifies those logits."""

    mode: str
    train: Any
    key: str


def student_targets(
    *, config, source: source_lib.DataSource, teacher: Teacher, teacher_dir: str, mesh: Mesh
) -> StudentTargets:
    """ "fixed": the teacher's logits of each image. "stored" (with augmentation): its logits on every view,
    computed once here for every method and seed (`teacher_pass.view_logits`). "online": the teacher runs in
    each step on the batch's views; knowledge infusion's class means still need every view, so a method that
    infuses gets the same views pass. Without augmentation every mode reads the image logits (one view
    each)."""
    mode = config.get("targets", "fixed")
    infuses = any("knowledge_infusion" in tuple(m.transforms) for m in config.methods.values())
    if source.augment and (mode == "stored" or (mode == "online" and infuses)):
        views, key = view_logits(
            config=config,
            source=source,
            variables=teacher.variables,
            model_name=teacher.meta["model"],
            stem=os.path.join(teacher_dir, "views"),
            mesh=mesh,
            label="teacher on every view",
        )
        return StudentTargets(mode, views, key)
    if source.augment and mode == "fixed":
        log.warning(
            "targets='fixed': the students train on augmented views but their targets come from the "
            "teacher on the un-augmented images (a fixed teacher); targets='stored' gives the teacher's "
            "logits on the views they see, computed once for every method and seed (docs/method.md)."
        )
    return StudentTargets(mode, teacher.logits["train"], teacher.key)


def _key(stores: dict, key: str) -> str:
    """The fingerprint of the logits themselves where they are in memory (small data), else the pass's key."""
    present = [stores[s] for s in SPLITS if stores.get(s) is not None]
    if all(isinstance(s, logits_store.ArrayLogits) for s in present):
        return fingerprint(*(s.all() for s in present))
    return key


def record_unreadable(stores: dict, source: source_lib.DataSource) -> None:
    """Logs the images the teacher pass could not read (the job lists them in skipped_files.csv)."""
    for split, store in stores.items():
        if isinstance(store, logits_store.LogitsStore):
            _, _, skipped = store.meta()
            if skipped:
                log.warning(
                    "data: %d unreadable image(s) in the %s split, e.g. %s", len(skipped), split, skipped[0]
                )


def unreadable_files(teacher: Teacher) -> list[tuple[str, str]]:
    """(id, reason) of every image the teacher pass could not read (files kind; none in memory)."""
    found = set()
    for store in (teacher.logits or {}).values():
        if isinstance(store, logits_store.LogitsStore):
            found.update(store.meta()[2])
    return sorted(found)


def infusion_table(store, labels: np.ndarray, mode: str) -> np.ndarray:
    """`targets.infusion_table` of a whole split, read chunk by chunk: each chunk's table weighted by its
    teacher-correct rows (per row c by its correct rows of label c), which is the whole split's table since
    each entry is a mean over the correct rows. One chunk (logits in memory): its table as it is. Over views
    (`ViewLogits`) a view the teacher gets wrong receives its label's mean over the correct views."""
    labels = logits_store.row_labels(store, labels)
    valid = store.valid
    in_memory = isinstance(store, logits_store.ArrayLogits) or (
        isinstance(store, logits_store.ViewLogits) and isinstance(store.store, logits_store.ArrayLogits)
    )
    pieces = list(store.chunks()) if in_memory else None
    if pieces is not None and len(pieces) == 1 and valid.all():
        rows, z = pieces[0]
        return np.asarray(targets_lib.infusion_table(z, labels[rows], mode), np.float32)
    k = store.num_classes
    total, weight = np.zeros((k, k)), np.zeros((k, 1))
    for rows, z in pieces or store.chunks():
        ok = valid[rows]
        z, y = z[ok], labels[rows][ok]
        correct = np.argmax(z, -1) == y
        if not correct.any():
            continue
        table = np.asarray(targets_lib.infusion_table(z, y, mode), np.float64)
        w = (
            np.full((k, 1), correct.sum(), np.float64)
            if mode == "pooled"
            else np.bincount(y[correct], minlength=k)[:, None].astype(np.float64)
        )
        total += w * table
        weight += w
    if not weight.any():
        raise UserError(
            "knowledge infusion needs at least one training image the teacher classifies correctly, "
            "found none; train the teacher longer or drop 'knowledge_infusion'"
        )
    return np.where(weight > 0, total / np.maximum(weight, 1e-12), _pooled_fallback(total, weight, k)).astype(
        np.float32
    )


def _pooled_fallback(total: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """For `per_class` rows of labels without a correct row: the pooled table (zF everywhere, zC at c), from
    the per-class rows that exist, weighted by their counts."""
    have = weight[:, 0] > 0
    rows = total[have] / weight[have]
    w = weight[have, 0]
    idx = np.flatnonzero(have)
    z_c = np.sum(w * rows[np.arange(len(idx)), idx]) / w.sum()
    z_f = np.sum(w * (rows.sum(1) - rows[np.arange(len(idx)), idx]) / (k - 1)) / w.sum()
    return z_f + (z_c - z_f) * np.eye(k)


def teacher_from_logits_file(config, source: source_lib.DataSource) -> tuple[dict, dict]:
    """`teacher.logits`: (its logits per split as arrays, aligned to `source` by image id -- val/test None
    when the file lacks them --, the teacher's metadata with the file's sha256). `UserError` for a file that
    does not fit (`teachers.read_logits_file`, `teachers.align_logits`)."""
    path = workdir_lib.expand(config.teacher.logits)
    file = teachers.read_logits_file(path)
    t_logits = teachers.align_logits(file, source)
    meta = {
        "model": f"logits file {os.path.basename(path)}",
        "logits_file": path,
        "logits_sha256": file.sha256,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "splits": [s for s in SPLITS if t_logits[s] is not None],
    }
    log.info("teacher: logits from %s (splits %s)", path, ", ".join(meta["splits"]))
    return t_logits, meta


def teacher_from_variables(config, source: source_lib.DataSource) -> tuple[dict, dict]:
    """`teacher.variables` with `teacher.model`: (the variables, checked against the model on one image, the
    teacher's metadata). `UserError` for variables that are unreadable or do not fit the model."""
    path = workdir_lib.expand(config.teacher.variables)
    variables = teachers.read_variables(path)
    model = models.get_model(config.teacher.model, source.num_classes, config.dtype)
    x = jax.ShapeDtypeStruct((1, source.image_size, source.image_size, 3), jnp.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - flax's shape/missing-variable errors
        raise UserError(
            f"teacher.variables={path!r} do not fit teacher.model={config.teacher.model!r} with "
            f"{source.num_classes} classes ({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the "
            "variables of that model."
        ) from e
    meta = {
        "model": config.teacher.model,
        "variables": path,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "image_size": source.image_size,
        "dtype": config.dtype,
    }
    log.info("teacher: %s from %s", config.teacher.model, path)
    return variables, meta
