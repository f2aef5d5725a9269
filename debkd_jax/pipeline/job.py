"""The main job, top to bottom, for every size of data: check, record the data, teacher -> logits, students,
results.

`train_and_evaluate(config, workdir)` is what `python -m debkd_jax.main` runs. `data.pipeline` only picks the
kind of data source ("memory": decoded arrays; "stream": image files read by grain; "auto": by size); every
step after that is the same for both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import ml_collections

from debkd_jax import config_checks, config_lib, methods, report, training, workdir_lib
from debkd_jax.data import source as source_lib
from debkd_jax.pipeline.diagnostics import run_diagnostics, run_meta
from debkd_jax.pipeline.folds import check_folds
from debkd_jax.pipeline.inputs import check_models, choose_kind, load_source, record_data, record_skipped
from debkd_jax.pipeline.student import train_student
from debkd_jax.pipeline.teacher import Teacher, get_teacher, given_teacher, student_targets, unreadable_files
from debkd_jax.pipeline.teacher_training import check_checkpoint

log = logging.getLogger("debkd_jax")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a checked job starts from: its data source (and why that kind), the device mesh, and a teacher
    given from elsewhere (None: trained here or reused)."""

    source: source_lib.DataSource
    why: str
    mesh: jax.sharding.Mesh
    given: Teacher | None


def check(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Everything that can be checked before anything is written (the processes joined first): the config,
    which kind of data and why, the data source, the models on its images, the folds, a teacher from
    elsewhere. A combination that cannot work is a one-line `UserError` here."""
    config_checks.validate_data_fields(config)
    kind, why = choose_kind(config)
    training.initialize_distributed(config)
    config_lib.validate_config(config)
    config_checks.validate_for_kind(config, kind)
    mesh = training.create_mesh()
    source = load_source(config, kind)
    check_models(config, source, with_teacher=not config.teacher.get("logits", ""))
    check_folds(config, source)
    check_checkpoint(config, source, os.path.join(workdir_lib.expand(workdir), "teacher"))
    return Setup(source, why, mesh, given_teacher(config, source))


def targets_record(source: source_lib.DataSource, targets) -> dict:
    """Where the students' targets came from (`config.targets`), and the views they trained on."""
    out = {"mode": targets.mode, "augment": source.augment}
    if source.augment:
        out.update(
            views=source.views, mixup=source.mixup, logits_of_views=hasattr(targets.train, "num_views")
        )
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, command: str | None = None) -> dict:
    """Teacher -> its logits on every split -> each method's student for each seed -> results, on data of
    either kind.

    Writes into `workdir`: config.json, splits.csv (id, split, label of every image), teacher/ (checkpoints,
    final model, teacher.json, its logits: logits.npz in memory, logits-<key>/ chunk files for image files;
    with `teacher.folds = K > 1` also folds-K/), students/<method>-seed<s>/ (checkpoints, final model,
    run.json, model.json, metrics.jsonl, TensorBoard events, result.json), results.json, results.md,
    val_accuracy.png, and skipped_files.csv when images were unreadable. Re-running the same command resumes
    an interrupted run and reuses finished parts; see docs/reliability.md.
    """
    setup = check(config, workdir)
    workdir = workdir_lib.expand(workdir)
    writer = jax.process_index() == 0
    with workdir_lib.Workdir(workdir, writer=writer) as wd:
        source, mesh = setup.source, setup.mesh
        # The record of what ran on what.
        wd.write_config(config)
        record_data(source, workdir, writer, setup.why, config.student.batch_size)

        # Teacher -> its logits on every split.
        teacher = get_teacher(
            config=config,
            source=source,
            teacher_dir=os.path.join(workdir, "teacher"),
            mesh=mesh,
            given=setup.given,
        )
        started = time.perf_counter()
        targets = student_targets(
            config=config,
            source=source,
            teacher=teacher,
            teacher_dir=os.path.join(workdir, "teacher"),
            mesh=mesh,
        )
        targets_seconds = time.perf_counter() - started
        unreadable = unreadable_files(teacher)
        if unreadable:
            source = dataclasses.replace(source, skipped=tuple(sorted({*source.skipped, *unreadable})))
            record_skipped(source.skipped, workdir, writer)

        # Students: every method, every seed.
        runs = [
            train_student(
                config=config,
                method_name=name,
                method_cfg=method_cfg,
                seed=seed,
                source=source,
                teacher=teacher,
                targets=targets,
                mesh=mesh,
                run_dir=os.path.join(workdir, "students", f"{workdir_lib.safe_name(name)}-seed{seed}"),
            )
            for name, method_cfg in methods.ordered(config.methods)
            for seed in range(config.seed, config.seed + config.seeds)
        ]

        # Results.
        results = report.summarize(
            config=config,
            source=source,
            teacher_meta=teacher.meta,
            teacher_test=teacher.test_metrics(source),
            runs=runs,
            diagnostics=run_diagnostics(config, source, teacher, targets),
        )
        results["targets"] = targets_record(source, targets)
        results["meta"] = {
            **run_meta(command, runs, teacher.meta),
            "data": {"kind": source.kind, "why": setup.why},
            "targets_seconds": targets_seconds,  # this invocation's pass over the views (0 when reused)
        }
        if writer:
            report.write_results(workdir, results)
        return results
