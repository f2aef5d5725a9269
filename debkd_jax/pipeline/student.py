"""One student, one method, one seed, on either kind of data: claim its folder, build its step, train it,
evaluate it, save it."""

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
from debkd_jax.data import source as source_lib
from debkd_jax.pipeline.identity import recorded_student, student_identity
from debkd_jax.pipeline.teacher import StudentTargets, Teacher, infusion_table

log = logging.getLogger("debkd_jax")


def train_student(
    *,
    config,
    method_name: str,
    method_cfg,
    seed: int,
    source: source_lib.DataSource,
    teacher: Teacher,
    targets: StudentTargets | None = None,
    mesh: Mesh,
    run_dir: str,
) -> dict:
    """Trains one student with one method and seed; returns its test metrics and history.

    A finished run in `run_dir` (result.json) with the same settings is reused, an interrupted one resumes
    from its last checkpoint; a folder started with other settings is refused (`workdir_lib.claim_run_dir`).
    With `config.overwrite`, an existing folder is set aside (renamed `<run_dir>.<time>`) and the student
    retrained. The method's targets are built in the train step from each batch's rows of the teacher's logits
    (`targets`: of each image, or of each view; or from the teacher run in the step, `config.targets =
    "online"`) and knowledge infusion's table, computed here once from those logits.
    """
    targets = targets or StudentTargets("fixed", teacher.logits["train"], teacher.key)
    identity = student_identity(
        config=config, method_cfg=method_cfg, seed=seed, source=source, teacher=teacher, targets=targets
    )
    done = claim_run(
        run_dir=run_dir, identity=identity, method_name=method_name, seed=seed, overwrite=config.overwrite
    )
    if done is not None:
        return done
    scfg = config.student
    online = targets.mode == "online" and method_cfg.loss != "ce"
    objective = methods.objective(method_cfg, scfg.num_epochs, online_targets=online)
    infusion = None
    if "knowledge_infusion" in objective.transforms:
        infusion = infusion_table(targets.train, source.splits["train"].labels, method_cfg.ki_mode)
    spec = student_step_spec(
        config=config,
        method_cfg=method_cfg,
        objective=objective,
        source=source,
        teacher=teacher,
        mesh=mesh,
        online=online,
    )
    started = time.perf_counter()
    result = training.fit(
        name=f"{method_name} (seed {seed})",
        spec=spec,
        train_cfg=scfg,
        source=source,
        logits=None if method_cfg.loss == "ce" or online else targets.train,
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
        source=source,
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
    save_student(config=config, variables=student_vars, source=source, result=out, run_dir=run_dir)
    return out


def claim_run(*, run_dir: str, identity: dict, method_name: str, seed: int, overwrite: bool) -> dict | None:
    """Claims `run_dir` for a student of `identity` (`workdir_lib.claim_run_dir`; with `overwrite` an existing
    folder is set aside first); returns its result when it finished before, else None."""
    writer = jax.process_index() == 0
    if overwrite and os.path.isdir(run_dir):
        if writer:
            moved = workdir_lib.keep_aside(run_dir)
            log.info("%s (seed %d): overwrite=True, the previous run is kept in %s", method_name, seed, moved)
    workdir_lib.claim_run_dir(
        run_dir, identity, f"a {method_name} student (seed {seed})", writer, upgrade=recorded_student
    )
    training.sync_processes("claim " + run_dir)
    done = workdir_lib.read_json(os.path.join(run_dir, "result.json"))
    if done is not None:
        log.info("%s (seed %d): finished before, reusing %s", method_name, seed, run_dir)
    return done


def student_step_spec(
    *,
    config,
    method_cfg,
    objective,
    source: source_lib.DataSource,
    teacher: Teacher,
    mesh: Mesh,
    online: bool = False,
) -> training.StepSpec:
    """The student's train step spec: the method's objective, the teacher network when it runs online (with
    `online`, the targets from it on each batch's views), and FitNets hint taps (the first, middle and last
    blocks both networks share) when the method uses hints."""
    scfg = config.student
    steps = len(source.splits["train"]) // scfg.batch_size
    kw: dict[str, Any] = {"method_cfg": method_cfg, "online_targets": online}
    conv_backward = training.resolve_conv_backward(config.get("conv_backward", "auto"), mesh, config.dtype)
    if objective.needs_teacher_online:
        kw["teacher"] = models.get_model(
            teacher.meta["model"], source.num_classes, config.dtype, conv_backward
        )
    if objective.uses_hints:
        x = jax.ShapeDtypeStruct((1, source.image_size, source.image_size, 3), jnp.float32)
        t_shapes = jax.eval_shape(lambda x: kw["teacher"].apply(teacher.variables, x, train=False)[1], x)
        student_blocks = len(
            jax.eval_shape(
                lambda x: models.get_model(scfg.model, source.num_classes).init_with_output(
                    jax.random.key(0), x, train=False
                )[0][1],
                x,
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
        scfg,
        source.num_classes,
        config.dtype,
        objective,
        steps,
        source.augments_on_device,
        conv_backward,
        **kw,
    )


def evaluate_student(
    *, config, method_cfg, variables, source: source_lib.DataSource, teacher: Teacher, infusion, mesh: Mesh
) -> dict:
    """The student's test metrics (`metrics.classification_metrics`) on the readable test images, with its
    agreement with the teacher and the share of its logits inside the method's target regions where the
    teacher's test logits exist."""
    backbone = models.get_model(config.student.model, source.num_classes, config.dtype)
    predict = training.make_predict_fn(backbone, jnp.dtype(config.dtype))
    test = source.splits["test"]
    test_logits, valid = training.split_logits(
        predict, variables, source, test, eval_batch_size=config.student.eval_batch_size, mesh=mesh
    )
    store = teacher.logits["test"]
    t_test, hits = None, None
    if store is not None:  # a logits file may lack the test split
        valid = valid & store.valid
        t_test = store.all()[valid]
    labels = test.labels[valid]
    test_logits = test_logits[valid]
    if t_test is not None:
        test_targets = methods.method_targets(method_cfg, t_test, labels, infusion=infusion)
        hits = np.asarray(
            losses.region_hits(
                test_logits, labels, test_targets.lo, test_targets.hi, temperature=method_cfg.temperature
            )
        )
    return metrics.classification_metrics(
        test_logits, labels, num_classes=source.num_classes, teacher_logits=t_test, region_hits=hits
    )


def model_record(config, source: source_lib.DataSource) -> dict:
    """`model.json`: what `export` needs to rebuild the network and `predict` to make its inputs."""
    return {
        "model": config.student.model,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "image_size": source.image_size,
        "dtype": config.dtype,
        "preprocessing": source.preprocessing,
    }


def save_student(*, config, variables, source: source_lib.DataSource, result: dict, run_dir: str) -> None:
    """`run_dir/final` (the variables; every process takes part, orbax syncs them), `model.json` and
    `result.json`."""
    workdir_lib.save_variables(os.path.join(run_dir, "final"), variables)
    if jax.process_index() == 0:
        workdir_lib.write_json(os.path.join(run_dir, "model.json"), model_record(config, source))
        workdir_lib.write_json(os.path.join(run_dir, "result.json"), result)
