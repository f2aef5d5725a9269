"""One student, one method, one seed: claim its folder, build its step, train it, evaluate it, save it."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from debkd_jax import losses, methods, metrics, models, training, workdir_lib
from debkd_jax import targets as targets_lib
from debkd_jax.pipeline.identity import student_identity
from debkd_jax.pipeline.teacher import Teacher

log = logging.getLogger("debkd_jax")


def train_student(
    *,
    config,
    method_name: str,
    method_cfg,
    seed: int,
    dataset,
    teacher: Teacher,
    mesh: Mesh,
    run_dir: str,
) -> dict:
    """Trains one student with one method and seed; returns its test metrics and history.

    A finished run in `run_dir` (result.json) with the same settings is reused, an interrupted one resumes
    from its last checkpoint; a folder started with other settings is refused (`workdir_lib.claim_run_dir`).
    With `config.overwrite`, an existing folder is set aside (renamed `<run_dir>.<time>`) and the student
    retrained.
    """
    done = claim_student(
        config=config,
        method_name=method_name,
        method_cfg=method_cfg,
        seed=seed,
        dataset=dataset,
        teacher=teacher,
        run_dir=run_dir,
    )
    if done is not None:
        return done
    scfg = config.student
    objective = methods.objective(method_cfg, scfg.num_epochs)
    train_targets = methods.method_targets(method_cfg, teacher.logits["train"], dataset.train_labels)
    infusion = None
    if "knowledge_infusion" in objective.transforms:
        infusion = targets_lib.infusion_table(
            teacher.logits["train"], dataset.train_labels, method_cfg.ki_mode
        )
    spec = student_step_spec(
        config=config, method_cfg=method_cfg, objective=objective, dataset=dataset, teacher=teacher, mesh=mesh
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
        teacher_vars=teacher.variables if objective.needs_teacher_online else None,
        infusion=infusion,
        show_progress=config.progress,
    )
    student_vars = {k: v["backbone"] for k, v in result.best_variables.items()}
    test = evaluate_student(
        config=config,
        method_cfg=method_cfg,
        variables=student_vars,
        dataset=dataset,
        teacher=teacher,
        infusion=infusion,
        mesh=mesh,
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
    save_student(config=config, variables=student_vars, dataset=dataset, result=out, run_dir=run_dir)
    return out


def claim_student(
    *, config, method_name: str, method_cfg, seed: int, dataset, teacher: Teacher, run_dir: str
) -> dict | None:
    """Claims `run_dir` for this student (`identity.student_identity`; with `config.overwrite` an existing
    folder is set aside first); returns its result when it finished before, else None."""
    identity = student_identity(
        config=config,
        method_cfg=method_cfg,
        seed=seed,
        dataset=dataset,
        t_logits=teacher.logits,
        teacher_meta=teacher.meta,
    )
    return claim_run(
        run_dir=run_dir, identity=identity, method_name=method_name, seed=seed, overwrite=config.overwrite
    )


def claim_run(*, run_dir: str, identity: dict, method_name: str, seed: int, overwrite: bool) -> dict | None:
    """Claims `run_dir` for a student of `identity` (`workdir_lib.claim_run_dir`; with `overwrite` an existing
    folder is set aside first); returns its result when it finished before, else None."""
    writer = jax.process_index() == 0
    if overwrite and os.path.isdir(run_dir):
        if writer:
            moved = workdir_lib.keep_aside(run_dir)
            log.info("%s (seed %d): overwrite=True, the previous run is kept in %s", method_name, seed, moved)
    workdir_lib.claim_run_dir(run_dir, identity, f"a {method_name} student (seed {seed})", writer)
    training.sync_processes("claim " + run_dir)
    done = workdir_lib.read_json(os.path.join(run_dir, "result.json"))
    if done is not None:
        log.info("%s (seed %d): finished before, reusing %s", method_name, seed, run_dir)
    return done


def student_step_spec(
    *, config, method_cfg, objective, dataset, teacher: Teacher, mesh: Mesh
) -> training.StepSpec:
    """The student's train step spec: the method's objective, the teacher network when it runs online, and
    FitNets hint taps (the first, middle and last blocks both networks share) when the method uses hints."""
    scfg = config.student
    steps = len(dataset.train_labels) // scfg.batch_size
    kw: dict[str, Any] = {"method_cfg": method_cfg}
    conv_backward = training.resolve_conv_backward(config.get("conv_backward", "auto"), mesh, config.dtype)
    if objective.needs_teacher_online:
        kw["teacher"] = models.get_model(
            teacher.meta["model"], dataset.num_classes, config.dtype, conv_backward
        )
    if objective.uses_hints:
        t_shapes = jax.eval_shape(
            lambda x: kw["teacher"].apply(teacher.variables, x, train=False)[1],
            dataset.train_images[:1] * 0.0,
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
    return training.build_step_spec(
        scfg, dataset.num_classes, config.dtype, objective, steps, config.data.augment, conv_backward, **kw
    )


def evaluate_student(
    *, config, method_cfg, variables, dataset, teacher: Teacher, infusion, mesh: Mesh
) -> dict:
    """The student's test metrics (`metrics.classification_metrics`), with its agreement with the teacher and
    the share of its logits inside the method's target regions where the teacher's test logits exist."""
    backbone = models.get_model(config.student.model, dataset.num_classes, config.dtype)
    predict = training.make_predict_fn(backbone, jnp.dtype(config.dtype))
    test_logits = training.predict_logits(
        predict, variables, dataset.test_images, config.student.eval_batch_size, mesh
    )
    t_test = teacher.logits["test"]
    hits = None
    if t_test is not None:  # a logits file may lack the test split
        test_targets = methods.method_targets(method_cfg, t_test, dataset.test_labels, infusion=infusion)
        hits = np.asarray(
            losses.region_hits(
                test_logits,
                dataset.test_labels,
                test_targets.lo,
                test_targets.hi,
                temperature=method_cfg.temperature,
            )
        )
    return metrics.classification_metrics(
        test_logits,
        dataset.test_labels,
        num_classes=dataset.num_classes,
        teacher_logits=t_test,
        region_hits=hits,
    )


def save_student(*, config, variables, dataset, result: dict, run_dir: str) -> None:
    """`run_dir/final` (the variables; every process takes part, orbax syncs them), `model.json` (what
    `export` needs to rebuild the network) and `result.json`."""
    workdir_lib.save_variables(os.path.join(run_dir, "final"), variables)
    if jax.process_index() == 0:
        workdir_lib.write_json(
            os.path.join(run_dir, "model.json"),
            {
                "model": config.student.model,
                "num_classes": dataset.num_classes,
                "class_names": list(dataset.class_names),
                "image_size": int(dataset.train_images.shape[1]),
                "dtype": config.dtype,
            },
        )
        workdir_lib.write_json(os.path.join(run_dir, "result.json"), result)
