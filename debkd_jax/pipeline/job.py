"""The main job, top to bottom: check, record the data, teacher -> logits, students, results.

`train_and_evaluate(config, workdir)` is what `python -m debkd_jax.main` runs.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections

from debkd_jax import config_lib, methods, models, report, training, workdir_lib
from debkd_jax import data as data_lib
from debkd_jax.errors import UserError
from debkd_jax.pipeline import stream
from debkd_jax.pipeline.diagnostics import run_diagnostics, run_meta
from debkd_jax.pipeline.folds import check_folds
from debkd_jax.pipeline.student import train_student
from debkd_jax.pipeline.teacher import get_teacher, given_teacher

log = logging.getLogger("debkd_jax")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, command: str | None = None) -> dict:
    """Teacher -> cached teacher logits -> targets -> each method's student for each seed -> results. With
    `data.pipeline = "stream"` (or "auto" choosing it) the same on streamed data (`pipeline.stream`).

    Writes into `workdir`: config.json, teacher/ (checkpoints, final model, teacher.json, logits.npz; with
    `teacher.folds = K > 1` also folds-K/: the fold teachers and out_of_fold.npz),
    students/<method>-seed<s>/ (checkpoints, final model, run.json, metrics.jsonl, TensorBoard events,
    result.json), results.json, results.md, val_accuracy.png, and skipped_files.csv when images were
    unreadable. Re-running the same command resumes an interrupted run and reuses finished parts; see
    docs/reliability.md.
    """
    config_lib.validate_stream_fields(config)
    choice, why = stream.choose(config)
    log.info("data: %s pipeline (%s)", choice, why)
    training.initialize_distributed(config)
    config_lib.validate_config(config)
    workdir = workdir_lib.expand(workdir)
    if choice == "stream":  # data.pipeline="stream" (or "auto" on data that would not fit): docs/scale.md
        return stream.train_and_evaluate(config, workdir, command, why)
    writer = jax.process_index() == 0
    with workdir_lib.Workdir(workdir, writer=writer) as wd:
        # Check: the data, the models and a teacher from elsewhere, before anything is written.
        mesh = training.create_mesh()
        dataset = load_data(config)
        check_models(config, dataset, with_teacher=not config.teacher.get("logits", ""))
        check_folds(config, dataset)
        given = given_teacher(config, dataset)

        # The record of what ran on what.
        wd.write_config(config)
        record_data(dataset, workdir, writer)

        # Teacher -> its logits on every split.
        teacher = get_teacher(
            config=config,
            dataset=dataset,
            teacher_dir=os.path.join(workdir, "teacher"),
            mesh=mesh,
            given=given,
        )

        # Students: every method, every seed.
        runs = [
            train_student(
                config=config,
                method_name=name,
                method_cfg=method_cfg,
                seed=seed,
                dataset=dataset,
                teacher=teacher,
                mesh=mesh,
                run_dir=os.path.join(workdir, "students", f"{workdir_lib.safe_name(name)}-seed{seed}"),
            )
            for name, method_cfg in methods.ordered(config.methods)
            for seed in range(config.seed, config.seed + config.seeds)
        ]

        # Results.
        results = report.summarize(
            config=config,
            dataset=dataset,
            teacher_meta=teacher.meta,
            teacher_test=teacher.test_metrics(dataset),
            runs=runs,
            diagnostics=run_diagnostics(config, dataset, teacher.logits),
        )
        results["meta"] = run_meta(command, runs, teacher.meta)
        if writer:
            report.write_results(workdir, results)
        return results


def load_data(config) -> data_lib.Dataset:
    """The configured data set; its errors (missing folder, one class, too few images) are `UserError`s."""
    d = config.data
    try:
        return data_lib.load_dataset(
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
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e
    except OSError as e:
        raise UserError(f"data.source={d.source!r}: cannot read it ({e}).") from e


def record_data(dataset, out_dir: str, writer: bool) -> None:
    """Logs the data set's classes and split sizes; lists unreadable files in `out_dir/skipped_files.csv`."""
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
        skipped_csv = os.path.join(out_dir, "skipped_files.csv")
        if writer:
            report.write_skipped_csv(dataset.skipped, skipped_csv)
        log.warning("data: skipped %d unreadable file(s), listed in %s", len(dataset.skipped), skipped_csv)


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
