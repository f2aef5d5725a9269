"""The main job on streamed data (`data.pipeline = "stream"`, docs/scale.md): the source listed, never decoded
whole; the teacher (given as variables, or trained here on the stream); one streamed teacher pass that writes
every split's logits to disk; each method's students trained on the stream with their targets computed in the
step from their batch's rows of the logits; results as the in-memory job writes them.

    workdir/teacher/            checkpoints, final, teacher.json (a teacher trained here)
    workdir/teacher/logits-<key>/<split>/   manifest.json, chunk-*.npy (logits), chunk-*.npz (valid, labels)
    workdir/students/<method>-seed<s>/      as the in-memory job
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from debkd_jax import losses, methods, metrics, models, report, teachers, training, workdir_lib
from debkd_jax.data import stream
from debkd_jax.errors import UserError
from debkd_jax.pipeline.diagnostics import run_meta
from debkd_jax.pipeline.stream_logits import (
    all_rows,
    gathered_logits,
    logits_key,
    stream_settings,
    streamed_infusion_table,
    teacher_pass,
)
from debkd_jax.pipeline.student import claim_run

log = logging.getLogger("debkd_jax")

SPLITS = ("train", "val", "test")


class StreamSummary:
    """What `report.summarize` reads of a dataset, for a streamed source: names, labels of the readable rows
    of each split (from the teacher pass) and the unreadable files."""

    def __init__(self, source: stream.StreamSource, labels: dict, skipped: list):
        self.source = source.name
        self.class_names = source.class_names
        self.num_classes = source.num_classes
        self.skipped = tuple(skipped)
        for split in SPLITS:
            setattr(self, f"{split}_labels", labels[split])


def plan(config) -> stream.StreamSource:
    d = config.data
    try:
        return stream.plan_stream(
            d.source,
            seed=config.seed,
            max_per_class=d.max_per_class or None,
            tfds_data_dir=d.tfds_data_dir or None,
        )
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e
    except OSError as e:
        raise UserError(f"data.source={d.source!r}: cannot read it ({e}).") from e


def check_teacher_variables(config, variables: dict, num_classes: int) -> None:
    model = models.get_model(config.teacher.model, num_classes, config.dtype)
    x = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    except Exception as e:  # noqa: BLE001 - flax's shape/missing-variable errors
        raise UserError(
            f"teacher.variables={config.teacher.variables!r} do not fit "
            f"teacher.model={config.teacher.model!r} with {num_classes} classes ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); give the variables of that model."
        ) from e


def stream_data(config, source, split_logits=None) -> training.StreamTrainData:
    d = config.data
    return training.StreamTrainData(
        train=source.splits["train"],
        val=source.splits["val"],
        image_size=d.image_size,
        augment=d.augment,
        eval_crop=d.eval_crop,
        workers=d.workers,
        logits=split_logits,
    )


def teacher_network(config, source, teacher_dir: str, mesh) -> tuple[dict, dict]:
    """`teacher.variables`, or a teacher trained here with CE on the stream (reused when finished)."""
    meta = {
        "model": config.teacher.model,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "image_size": config.data.image_size,
        "dtype": config.dtype,
    }
    if config.teacher.get("variables", ""):
        path = workdir_lib.expand(config.teacher.variables)
        variables = teachers.read_variables(path)
        check_teacher_variables(config, variables, source.num_classes)
        log.info("teacher: %s from %s", config.teacher.model, path)
        return variables, {**meta, "variables": path}
    identity = {
        "teacher": {k: v for k, v in config.teacher.to_dict().items() if k != "eval_batch_size"},
        "seed": config.seed,
        "dtype": config.dtype,
        "data": source.fingerprint,
        "stream": stream_settings(config),
    }
    writer = jax.process_index() == 0
    workdir_lib.claim_run_dir(teacher_dir, identity, "a teacher", writer, config.overwrite)
    training.sync_processes("claim " + teacher_dir)
    saved = workdir_lib.read_json(os.path.join(teacher_dir, "teacher.json"))
    if saved is not None:
        log.info("teacher: reusing %s", teacher_dir)
        return workdir_lib.restore_variables(os.path.join(teacher_dir, "final")), saved
    started = time.perf_counter()
    result = fit_on_stream(
        config, config.teacher, methods.preset("CE"), source, None, teacher_dir, mesh, config.seed, "teacher"
    )
    variables = {k: v["backbone"] for k, v in result.best_variables.items()}
    meta.update(
        best_epoch=result.best_epoch, history=result.history, wall_seconds=time.perf_counter() - started
    )
    workdir_lib.save_variables(os.path.join(teacher_dir, "final"), variables)
    if writer:
        workdir_lib.write_json(os.path.join(teacher_dir, "teacher.json"), meta)
    return variables, meta


def fit_on_stream(config, train_cfg, method_cfg, source, store, run_dir, mesh, seed, name, teacher_vars=None):
    objective = methods.objective(method_cfg, train_cfg.num_epochs)
    conv_backward = training.resolve_conv_backward(config.get("conv_backward", "auto"), mesh)
    kw = {"method_cfg": method_cfg}
    if objective.uses_hints:
        raise UserError(
            f"{name}: feature hints (hint_weight) are not available with data.pipeline='stream'; "
            "use a method without hints or data.pipeline='memory'"
        )
    if objective.needs_teacher_online:
        kw["teacher"] = models.get_model(
            config.teacher.model, source.num_classes, config.dtype, conv_backward
        )
    data = stream_data(config, source, store)
    steps = len(data.train) // train_cfg.batch_size
    # Augmentation runs in the loader (random-resized crop + flip), not in the step.
    spec = training.build_step_spec(
        train_cfg, source.num_classes, config.dtype, objective, steps, False, conv_backward, **kw
    )
    infusion = None
    if "knowledge_infusion" in objective.transforms:
        infusion = streamed_infusion_table(store, method_cfg.ki_mode)
    return training.fit(
        name=name,
        spec=spec,
        train_cfg=train_cfg,
        dataset=None,
        train_targets=None,
        run_dir=run_dir,
        mesh=mesh,
        seed=seed,
        stream=data,
        show_progress=config.progress,
        teacher_vars=teacher_vars if objective.needs_teacher_online else None,
        infusion=infusion,
    )


def choose(config) -> tuple[str, str]:
    """("memory" | "stream", why) for `data.pipeline` (`stream.choose_pipeline`); `UserError` for a bad value
    or an unreadable source."""
    d = config.data
    try:
        return stream.choose_pipeline(
            d.get("pipeline", "memory"), d.source, d.image_size, d.tfds_data_dir or None
        )
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e


def train_and_evaluate(config, workdir: str, command: str | None = None, reason: str = "") -> dict:
    """The streamed job (module docstring); writes what the in-memory `train_and_evaluate` writes.

    Called by `job.train_and_evaluate` with processes joined, the config validated and `workdir` expanded."""
    writer = jax.process_index() == 0
    with workdir_lib.Workdir(workdir, writer=writer) as wd:
        mesh = training.create_mesh()
        source = plan(config)
        log.info(
            "data: streamed (%s): %s, %d classes, train/val/test = %d/%d/%d rows; process %d of %d reads "
            "its %d of every global batch of %d",
            reason or "data.pipeline='stream'",
            source.name,
            source.num_classes,
            *(len(source.splits[s]) for s in SPLITS),
            jax.process_index(),
            jax.process_count(),
            config.student.batch_size // jax.process_count(),
            config.student.batch_size,
        )
        if config.teacher.get("logits", ""):
            raise UserError(
                "teacher.logits (an .npz of logits) is for data.pipeline='memory'; with streamed data "
                "give teacher.variables (the teacher pass writes its logits to disk)"
            )
        wd.write_config(config)
        teacher_dir = os.path.join(workdir, "teacher")
        teacher_vars, teacher_meta = teacher_network(config, source, teacher_dir, mesh)
        key = logits_key(teacher_vars, source, config)
        stores = teacher_pass(config, teacher_vars, source, os.path.join(teacher_dir, f"logits-{key}"), mesh)
        labels, skipped, t_test = {}, [], None
        for split in SPLITS:
            valid, split_labels, split_skipped = stores[split].meta()
            labels[split] = split_labels[valid]
            if split != "val" or source.splits["val"] is not source.splits["test"]:
                skipped.extend(split_skipped)
        skipped = sorted(set(skipped))
        if skipped:
            skipped_csv = os.path.join(workdir, "skipped_files.csv")
            if writer:
                report.write_skipped_csv(skipped, skipped_csv)
            log.warning("data: skipped %d unreadable file(s), listed in %s", len(skipped), skipped_csv)
        test_valid = stores["test"].meta()[0]
        t_test_logits = all_rows(stores["test"])[test_valid]
        t_test = metrics.classification_metrics(t_test_logits, labels["test"], num_classes=source.num_classes)
        runs = []
        for method_name, method_cfg in methods.ordered(config.methods):
            for s in range(config.seeds):
                seed = config.seed + s
                run_dir = os.path.join(
                    workdir, "students", f"{workdir_lib.safe_name(method_name)}-seed{seed}"
                )
                runs.append(
                    train_student(
                        config=config,
                        method_name=method_name,
                        method_cfg=method_cfg,
                        seed=seed,
                        source=source,
                        stores=stores,
                        teacher_vars=teacher_vars,
                        t_test_logits=t_test_logits,
                        test_valid=test_valid,
                        test_labels=labels["test"],
                        mesh=mesh,
                        run_dir=run_dir,
                        key=key,
                    )
                )
        teacher_accuracy = {
            s: float(np.mean(np.argmax(all_rows(stores[s])[stores[s].meta()[0]], -1) == labels[s]))
            for s in ("val", "test")
        }
        summary = StreamSummary(source, labels, skipped)
        results = report.summarize(
            config=config,
            dataset=summary,
            teacher_meta=teacher_meta,
            teacher_test=t_test,
            runs=runs,
            diagnostics={"teacher_accuracy": {"train": None, **teacher_accuracy}, "methods": {}},
        )
        results["meta"] = {**run_meta(command, runs, teacher_meta), "pipeline": "stream", "why": reason}
        if writer:
            report.write_results(workdir, results)
        return results


def train_student(
    *,
    config,
    method_name,
    method_cfg,
    seed,
    source,
    stores,
    teacher_vars,
    t_test_logits,
    test_valid,
    test_labels,
    mesh,
    run_dir,
    key,
) -> dict:
    writer = jax.process_index() == 0
    identity = {
        "method": method_cfg.to_dict(),
        "student": {k: v for k, v in config.student.to_dict().items() if k != "eval_batch_size"},
        "seed": seed,
        "dtype": config.dtype,
        "data": source.fingerprint,
        "stream": stream_settings(config),
        "teacher_logits": key,
    }
    done = claim_run(
        run_dir=run_dir, identity=identity, method_name=method_name, seed=seed, overwrite=config.overwrite
    )
    if done is not None:
        return done
    started = time.perf_counter()
    result = fit_on_stream(
        config,
        config.student,
        method_cfg,
        source,
        None if method_cfg.loss == "ce" else stores["train"],
        run_dir,
        mesh,
        seed,
        f"{method_name} (seed {seed})",
        teacher_vars,
    )
    student_vars = {k: v["backbone"] for k, v in result.best_variables.items()}
    test_logits = gathered_logits(
        config, student_vars, config.student.model, source.splits["test"], source.num_classes, mesh
    )[test_valid]
    hits = None
    if method_cfg.loss == "debkd":
        built = methods.method_targets(
            method_cfg,
            t_test_logits,
            test_labels,
            infusion=streamed_infusion_table(stores["train"], method_cfg.ki_mode)
            if "knowledge_infusion" in methods.objective(method_cfg, 1).transforms
            else None,
        )
        hits = np.asarray(
            losses.region_hits(
                test_logits, test_labels, built.lo, built.hi, temperature=method_cfg.temperature
            )
        )
    test = metrics.classification_metrics(
        test_logits,
        test_labels,
        num_classes=source.num_classes,
        teacher_logits=t_test_logits,
        region_hits=hits,
    )
    out = {
        "method": method_name,
        "seed": seed,
        "model": config.student.model,
        "config": method_cfg.to_dict(),
        "best_epoch": result.best_epoch,
        "wall_seconds": time.perf_counter() - started,
        "test": test,
        "history": result.history,
    }
    workdir_lib.save_variables(os.path.join(run_dir, "final"), student_vars)
    if writer:
        workdir_lib.write_json(
            os.path.join(run_dir, "model.json"),
            {
                "model": config.student.model,
                "num_classes": source.num_classes,
                "class_names": list(source.class_names),
                "image_size": config.data.image_size,
                "dtype": config.dtype,
            },
        )
        workdir_lib.write_json(os.path.join(run_dir, "result.json"), out)
    return out
