"""The main job: data -> teacher -> its logits (cached) -> targets -> each method's students -> results.

`train_and_evaluate(config, workdir)` is what `python -m debkd_jax.main` runs; `debkd_jax.sweep` reuses
`train_teacher`, `teacher_logits` and `train_student`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from debkd_jax import config_lib, losses, methods, metrics, models, report, teachers, training, workdir_lib
from debkd_jax import data as data_lib
from debkd_jax import targets as targets_lib
from debkd_jax.errors import UserError

log = logging.getLogger("debkd_jax")


def _fingerprint(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def load_data(config) -> data_lib.Dataset:
    """The configured data set; its errors (missing folder, one class, too few images) are `UserError`s."""
    d = config.data
    try:
        return _load_dataset(config, d)
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e
    except OSError as e:
        raise UserError(f"data.source={d.source!r}: cannot read it ({e}).") from e


def _load_dataset(config, d) -> data_lib.Dataset:
    dataset = data_lib.load_dataset(
        d.source,
        cache_dir=workdir_lib.expand(d.cache_dir) if d.cache_dir else None,
        seed=config.seed,
        image_size=d.image_size,
        max_per_class=d.max_per_class or None,
        digits_classes=d.digits_classes,
        tfds_data_dir=d.tfds_data_dir or None,
        use_dataset_test_split=d.use_dataset_test_split,
        progress=config.progress,
    )
    return dataset


def train_teacher(
    config, dataset, run_dir: str, mesh: Mesh, fold: tuple[int, int] | None = None
) -> tuple[dict, dict]:
    """Trains (or reloads) the teacher; returns its eval variables and its metadata. `fold=(k, K)`: the
    teacher of fold k of K (`dataset` then holds the other folds' training images; `out_of_fold_logits`)."""
    meta = {
        "model": config.teacher.model,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "image_size": int(dataset.train_images.shape[1]),
        "data": _fingerprint(dataset.train_images, dataset.train_labels),
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


def _training_fields(train_cfg) -> dict:
    """The fields of a teacher/student config that decide its training (not eval_batch_size, checkpoint)."""
    skip = ("eval_batch_size", "checkpoint", "logits", "variables", "folds")
    return {k: v for k, v in train_cfg.to_dict().items() if k not in skip}


def teacher_identity(config, meta: dict) -> dict:
    identity = {
        "teacher": _training_fields(config.teacher),
        "seed": config.seed,
        "dtype": config.dtype,
        "augment": config.data.augment,
        "data": meta["data"],
        "class_names": meta["class_names"],
        "image_size": meta["image_size"],
    }
    if "fold" in meta:
        identity["fold"] = meta["fold"]
    return identity


def student_identity(
    config, method_cfg, seed: int, dataset, t_logits, teacher_meta: dict | None = None
) -> dict:
    """What decides a student: a run folder with another identity is refused (`workdir_lib.claim_run_dir`).
    The teacher enters through its logits (the splits it has) and, for a logits file, the file's sha256."""
    identity = {
        "method": method_cfg.to_dict(),
        "student": _training_fields(config.student),
        "seed": seed,
        "dtype": config.dtype,
        "augment": config.data.augment,
        "data": _fingerprint(dataset.train_images, dataset.train_labels),
        "teacher_logits": _fingerprint(
            *(t_logits[s] for s in ("train", "val", "test") if t_logits[s] is not None)
        ),
    }
    if teacher_meta and teacher_meta.get("logits_sha256"):
        identity["teacher_logits_file"] = teacher_meta["logits_sha256"]
    return identity


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
        "splits": [s for s in ("train", "val", "test") if t_logits[s] is not None],
    }
    log.info("teacher: logits from %s (splits %s)", path, ", ".join(meta["splits"]))
    return t_logits, meta


def check_models(config, dataset, with_teacher: bool) -> None:
    """Builds the student (and the teacher network, `with_teacher`) abstractly on one image before anything
    is written: a failing factory, logits of the wrong shape, or features FKD cannot tap are `UserError`s."""
    x = jax.ShapeDtypeStruct((1, *dataset.train_images.shape[1:]), jnp.float32)
    uses_hints = any(m.hint_weight for m in config.methods.values())
    for part in ("student", "teacher") if with_teacher else ("student",):
        name = config[part].model
        try:
            model = models.get_model(name, dataset.num_classes, config.dtype)
            _, features = jax.eval_shape(
                lambda v, m=model: m.init_with_output(jax.random.key(0), v, train=False)[0], x
            )
            if uses_hints:
                models.check_features_for_hints(name, features)
        except UserError as e:
            raise UserError(f"{part}.{e}") from e
        except Exception as e:  # noqa: BLE001 - the user's module failing on these images
            if not models.is_factory_spec(name):
                raise
            raise UserError(
                f"{part}.model={name!r} fails on images of shape {x.shape} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); check data.image_size and the module."
            ) from e


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


def placeholder_targets(n: int, k: int) -> targets_lib.Targets:
    z = np.zeros((n, k), np.float32)
    return targets_lib.Targets(logits=z, lo=z, hi=z + 1.0, correct=np.ones((n,), bool))


def teacher_logits(
    config, teacher_vars, meta, dataset, teacher_dir: str, mesh: Mesh
) -> dict[str, np.ndarray]:
    """The teacher's eval-mode logits on every split, cached beside its checkpoint (keyed to it and the data)."""
    key = _fingerprint(
        *jax.tree.leaves(jax.tree.map(np.asarray, teacher_vars)), dataset.train_images, dataset.test_images
    )
    images = {split: getattr(dataset, f"{split}_images") for split in ("train", "val", "test")}
    return cached_logits(
        config,
        teacher_vars,
        meta["model"],
        dataset.num_classes,
        images,
        os.path.join(teacher_dir, "logits.npz"),
        key,
        mesh,
        "teacher logits",
    )


def cached_logits(
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
        variables, meta = train_teacher(fold_config, subset, run_dir, mesh, fold=(k, num_folds))
        heldout = dataset.train_images[held]
        key = _fingerprint(*jax.tree.leaves(jax.tree.map(np.asarray, variables)), heldout)
        logits[held] = cached_logits(
            config,
            variables,
            meta["model"],
            dataset.num_classes,
            {"heldout": heldout},
            os.path.join(run_dir, "heldout_logits.npz"),
            key,
            mesh,
            f"teacher of fold {k + 1}/{num_folds}",
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
    config, dataset, t_logits: dict, teacher_meta: dict, teacher_dir: str, mesh: Mesh
):
    """(t_logits, teacher_meta) as they are for `teacher.folds = 1`; for K > 1 the training split's logits
    replaced by `out_of_fold_logits`, and `teacher_meta["out_of_fold"]` saying what was done (with the
    teacher's own training accuracy, `train_accuracy_own`)."""
    if config.teacher.get("folds", 1) == 1:
        return t_logits, teacher_meta
    logits, info = out_of_fold_logits(config, dataset, teacher_dir, mesh)
    info["train_accuracy_own"] = float(np.mean(np.argmax(t_logits["train"], -1) == dataset.train_labels))
    return {**t_logits, "train": logits}, {**teacher_meta, "out_of_fold": info}


def train_student(
    config, method_name: str, method_cfg, seed: int, dataset, teacher, t_logits, mesh: Mesh, run_dir: str
) -> dict:
    """Trains one student with one method and seed; returns its test metrics and history.

    A finished run in `run_dir` (result.json) with the same settings is reused, an interrupted one resumes
    from its last checkpoint; a folder started with other settings is refused (`workdir_lib.claim_run_dir`).
    With `config.overwrite`, an existing folder is set aside (renamed `<run_dir>.<time>`) and the student
    retrained.
    """
    writer = jax.process_index() == 0
    identity = student_identity(config, method_cfg, seed, dataset, t_logits, teacher[1])
    if config.overwrite and os.path.isdir(run_dir):
        if writer:
            moved = workdir_lib.keep_aside(run_dir)
            log.info("%s (seed %d): overwrite=True, the previous run is kept in %s", method_name, seed, moved)
    workdir_lib.claim_run_dir(run_dir, identity, f"a {method_name} student (seed {seed})", writer)
    training.sync_processes("claim " + run_dir)
    done = workdir_lib.read_json(os.path.join(run_dir, "result.json"))
    if done is not None:
        log.info("%s (seed %d): finished before, reusing %s", method_name, seed, run_dir)
        return done
    teacher_vars, teacher_meta = teacher
    scfg = config.student
    objective = methods.objective(method_cfg, scfg.num_epochs)
    train_targets = methods.method_targets(method_cfg, t_logits["train"], dataset.train_labels)
    infusion = None
    if "knowledge_infusion" in objective.transforms:
        infusion = targets_lib.infusion_table(t_logits["train"], dataset.train_labels, method_cfg.ki_mode)
    steps = len(dataset.train_labels) // scfg.batch_size
    kw: dict[str, Any] = {"method_cfg": method_cfg}
    conv_backward = training.resolve_conv_backward(config.get("conv_backward", "auto"), mesh, config.dtype)
    if objective.needs_teacher_online:
        kw["teacher"] = models.get_model(
            teacher_meta["model"], dataset.num_classes, config.dtype, conv_backward
        )
    if objective.uses_hints:
        t_shapes = jax.eval_shape(
            lambda x: kw["teacher"].apply(teacher_vars, x, train=False)[1], dataset.train_images[:1] * 0.0
        )
        student_blocks = len(
            jax.eval_shape(
                lambda x: models.get_model(scfg.model, dataset.num_classes).init_with_output(
                    jax.random.key(0), x, train=False
                )[0][1],
                dataset.train_images[:1] * 0.0,
            )
        )
        t_taps = models.feature_taps(len(t_shapes), "teacher")
        s_taps = models.feature_taps(student_blocks, "student")
        n = min(len(t_taps), len(s_taps))
        t_taps, s_taps = t_taps[:n], s_taps[:n]
        kw["teacher_taps"] = t_taps
        kw["student_kw"] = {
            "taps": s_taps,
            "hint_shapes": tuple(tuple(int(d) for d in t_shapes[i].shape[1:]) for i in t_taps),
        }
    spec = training.build_step_spec(
        scfg, dataset.num_classes, config.dtype, objective, steps, config.data.augment, conv_backward, **kw
    )
    started = time.perf_counter()
    result = training.fit(
        name=f"{method_name} (seed {seed})",
        spec=spec,
        train_cfg=scfg,
        dataset=dataset,
        train_targets=train_targets,
        run_dir=run_dir,
        mesh=mesh,
        seed=seed,
        teacher_vars=teacher_vars if objective.needs_teacher_online else None,
        infusion=infusion,
        show_progress=config.progress,
    )
    backbone = models.get_model(scfg.model, dataset.num_classes, config.dtype)
    student_vars = {k: v["backbone"] for k, v in result.best_variables.items()}
    predict = training.make_predict_fn(backbone, jnp.dtype(config.dtype))
    test_logits = training.predict_logits(
        predict, student_vars, dataset.test_images, scfg.eval_batch_size, mesh
    )
    hits = None
    if t_logits["test"] is not None:  # a logits file may lack the test split
        test_targets = methods.method_targets(
            method_cfg, t_logits["test"], dataset.test_labels, infusion=infusion
        )
        hits = np.asarray(
            losses.region_hits(
                test_logits,
                dataset.test_labels,
                test_targets.lo,
                test_targets.hi,
                temperature=method_cfg.temperature,
            )
        )
    test = metrics.classification_metrics(
        test_logits,
        dataset.test_labels,
        num_classes=dataset.num_classes,
        teacher_logits=t_logits["test"],
        region_hits=hits,
    )
    out = {
        "method": method_name,
        "seed": seed,
        "model": scfg.model,
        "config": method_cfg.to_dict(),
        "best_epoch": result.best_epoch,
        # Training and evaluation time of this process (after a resume: of the part run since).
        "wall_seconds": time.perf_counter() - started,
        "test": test,
        "history": result.history,
    }
    workdir_lib.save_variables(
        os.path.join(run_dir, "final"), student_vars
    )  # every process: orbax syncs them
    if jax.process_index() == 0:
        workdir_lib.write_json(
            os.path.join(run_dir, "model.json"),
            {
                "model": scfg.model,
                "num_classes": dataset.num_classes,
                "class_names": list(dataset.class_names),
                "image_size": int(dataset.train_images.shape[1]),
                "dtype": config.dtype,
            },
        )
        workdir_lib.write_json(os.path.join(run_dir, "result.json"), out)
    return out


def target_diagnostics(method_cfg, teacher_logits: np.ndarray, labels: np.ndarray) -> dict:
    """What a method's targets do to the teacher's training logits: the share of images they classify wrongly
    after the method's transforms, the share of images the transforms changed, and (for the de-biased loss)
    the mean width of the interval the true class's target may take (`targets.label_interval`)."""
    built = methods.method_targets(method_cfg, teacher_logits, labels)
    logits = np.asarray(built.logits)
    lo_y, hi_y = targets_lib.label_interval(built.lo, built.hi, labels)
    return {
        "targets_wrong": float(np.mean(np.argmax(logits, -1) != labels)),
        "changed": float(np.mean(np.any(logits != np.asarray(teacher_logits, np.float32), axis=-1))),
        "region_width": float(np.mean(np.asarray(hi_y) - np.asarray(lo_y)))
        if method_cfg.loss == "debkd"
        else None,
    }


def run_diagnostics(config, dataset, t_logits: dict) -> dict:
    """The teacher's accuracy on every split (None for a split a logits file lacks), and `target_diagnostics`
    of every method except plain CE."""
    teacher = {
        split: float(np.mean(np.argmax(t_logits[split], -1) == getattr(dataset, f"{split}_labels")))
        if t_logits[split] is not None
        else None
        for split in ("train", "val", "test")
    }
    per_method = {
        name: target_diagnostics(cfg, t_logits["train"], dataset.train_labels)
        for name, cfg in config.methods.items()
        if cfg.loss != "ce"
    }
    return {"teacher_accuracy": teacher, "methods": per_method}


def run_meta(command: str | None, runs: list[dict], teacher_meta: dict) -> dict:
    """When and with what the results were made: the command, library versions, the finishing time and the
    students' summed training time (a reused student counts with the time it took when it was trained)."""
    import datetime
    import platform

    import flax
    import optax

    return {
        "command": command,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        "student_seconds": float(sum(r.get("wall_seconds", 0.0) for r in runs)),
        "teacher_seconds": teacher_meta.get("wall_seconds"),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, command: str | None = None) -> dict:
    """Teacher -> cached teacher logits -> targets -> each method's student for each seed -> results.

    Writes into `workdir`: config.json, teacher/ (checkpoints, final model, teacher.json, logits.npz; with
    `teacher.folds = K > 1` also folds-K/: the fold teachers and out_of_fold.npz),
    students/<method>-seed<s>/ (checkpoints, final model, run.json, metrics.jsonl, TensorBoard events,
    result.json), results.json, results.md, val_accuracy.png, and skipped_files.csv when images were
    unreadable. Re-running the same command resumes an interrupted run and reuses finished parts; see
    docs/reliability.md.
    """
    training.initialize_distributed(config)
    config_lib.validate_config(config)
    workdir = workdir_lib.expand(workdir)
    writer = jax.process_index() == 0
    with workdir_lib.Workdir(workdir, writer=writer) as wd:
        mesh = training.create_mesh()
        dataset = load_data(config)
        from_file = bool(config.teacher.get("logits", ""))
        given_vars = bool(config.teacher.get("variables", ""))
        check_models(config, dataset, with_teacher=not from_file)
        check_folds(config, dataset)
        # A teacher from elsewhere is checked before anything is written.
        if from_file:
            t_logits, teacher_meta = teacher_from_logits_file(config, dataset)
        elif given_vars:
            teacher_vars, teacher_meta = teacher_from_variables(config, dataset)
        wd.write_config(config)
        log.info(
            "data: %s, %d classes %s, train/val/test = %d/%d/%d",
            dataset.source,
            dataset.num_classes,
            dataset.class_names,
            len(dataset.train_labels),
            len(dataset.val_labels),
            len(dataset.test_labels),
        )
        if dataset.skipped:
            skipped_csv = os.path.join(workdir, "skipped_files.csv")
            if writer:
                report.write_skipped_csv(dataset.skipped, skipped_csv)
            log.warning(
                "data: skipped %d unreadable file(s), listed in %s", len(dataset.skipped), skipped_csv
            )
        teacher_dir = os.path.join(workdir, "teacher")
        if from_file:
            teacher_vars = None
        else:
            if not given_vars:
                teacher_vars, teacher_meta = train_teacher(config, dataset, teacher_dir, mesh)
            t_logits = teacher_logits(config, teacher_vars, teacher_meta, dataset, teacher_dir, mesh)
            t_logits, teacher_meta = with_out_of_fold_logits(
                config, dataset, t_logits, teacher_meta, teacher_dir, mesh
            )
        teacher_test = None  # a logits file without the test split: the teacher's row says so
        if t_logits["test"] is not None:
            teacher_test = metrics.classification_metrics(
                t_logits["test"], dataset.test_labels, num_classes=dataset.num_classes
            )
        runs = []
        for method_name, method_cfg in methods.ordered(config.methods):
            for s in range(config.seeds):
                seed = config.seed + s
                run_dir = os.path.join(
                    workdir, "students", f"{workdir_lib.safe_name(method_name)}-seed{seed}"
                )
                runs.append(
                    train_student(
                        config,
                        method_name,
                        method_cfg,
                        seed,
                        dataset,
                        (teacher_vars, teacher_meta),
                        t_logits,
                        mesh,
                        run_dir,
                    )
                )
        diagnostics = run_diagnostics(config, dataset, t_logits)
        results = report.summarize(config, dataset, teacher_meta, teacher_test, runs, diagnostics)
        results["meta"] = run_meta(command, runs, teacher_meta)
        if writer:
            report.write_results(workdir, results)
        return results
