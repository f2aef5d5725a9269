"""A job's data: which kind (`data.pipeline`), the source of that kind, its record in the workdir, and the
models checked against it before anything is written."""

from __future__ import annotations

import csv
import io
import logging
import os

import jax
import jax.numpy as jnp

from debkd_jax import data as data_lib
from debkd_jax import models, report, workdir_lib
from debkd_jax.data import source as source_lib
from debkd_jax.data import stream
from debkd_jax.errors import UserError

log = logging.getLogger("debkd_jax")

KIND_OF_PIPELINE = {"memory": "memory", "stream": "files"}


def choose_kind(config) -> tuple[str, str]:
    """("memory" | "files", why) for `data.pipeline` ("memory", "stream", or "auto":
    `stream.choose_pipeline`); `UserError` for a bad value or an unreadable source."""
    d = config.data
    try:
        pipeline, why = stream.choose_pipeline(
            d.get("pipeline", "memory"), d.source, d.image_size, d.tfds_data_dir or None
        )
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e
    return KIND_OF_PIPELINE[pipeline], why


def load_source(config, kind: str) -> source_lib.DataSource:
    """The configured source as `kind`; its errors (missing folder, one class, too few images, `digits` as
    files) are `UserError`s naming `data.source`."""
    d = config.data
    cache_dir = workdir_lib.expand(d.cache_dir) if d.cache_dir else None
    try:
        if kind == "memory":
            dataset = data_lib.load_dataset(
                d.source,
                cache_dir=cache_dir,
                seed=config.seed,
                image_size=d.image_size,
                max_per_class=d.max_per_class or None,
                digits_classes=d.digits_classes,
                tfds_data_dir=d.tfds_data_dir or None,
                use_dataset_test_split=d.use_dataset_test_split,
                progress=config.progress,
            )
            return source_lib.memory_source(
                dataset,
                augment=d.augment,
                views=d.get("views", 16),
                mixup=d.get("mixup", 0.0),
                view_seed=config.seed,
            )
        planned = stream.plan_stream(
            d.source,
            seed=config.seed,
            max_per_class=d.max_per_class or None,
            tfds_data_dir=d.tfds_data_dir or None,
            use_dataset_test_split=d.use_dataset_test_split,
            cache_dir=cache_dir,
        )
        return source_lib.files_source(
            planned,
            views=d.get("views", 16),
            mixup=d.get("mixup", 0.0),
            view_seed=config.seed,
            name=d.source,
            image_size=d.image_size,
            augment=d.augment,
            eval_crop=d.eval_crop,
            workers=d.workers,
        )
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e
    except OSError as e:
        raise UserError(f"data.source={d.source!r}: cannot read it ({e}).") from e


def record_data(
    source: source_lib.DataSource, out_dir: str, writer: bool, why: str = "", batch_size: int = 0
) -> None:
    """Logs the source's kind, classes and split sizes; writes `out_dir/splits.csv` (id, split, label of every
    row) and lists unreadable files in `out_dir/skipped_files.csv`."""
    sizes = [len(source.splits[s]) for s in source_lib.SPLITS]
    log.info(
        "data: %s (%s), %s, %d classes %s, train/val/test = %d/%d/%d",
        source.kind,
        why or f"data.pipeline for {source.kind}",
        source.name,
        source.num_classes,
        source.class_names,
        *sizes,
    )
    if source.kind == "files" and batch_size:
        log.info(
            "data: process %d of %d reads its %d of every global batch of %d",
            jax.process_index(),
            jax.process_count(),
            batch_size // jax.process_count(),
            batch_size,
        )
    if writer:
        buffer = io.StringIO()
        rows = csv.writer(buffer, lineterminator="\n")
        rows.writerow(("id", "split", "label"))
        rows.writerows(source_lib.splits_rows(source))
        workdir_lib.atomic_write_bytes(os.path.join(out_dir, "splits.csv"), buffer.getvalue().encode())
    record_skipped(source.skipped, out_dir, writer)


def record_skipped(skipped, out_dir: str, writer: bool) -> None:
    if skipped:
        skipped_csv = os.path.join(out_dir, "skipped_files.csv")
        if writer:
            report.write_skipped_csv(skipped, skipped_csv)
        log.warning("data: skipped %d unreadable file(s), listed in %s", len(skipped), skipped_csv)


def check_models(config, source: source_lib.DataSource, with_teacher: bool) -> None:
    """Builds the student (and the teacher network, `with_teacher`) abstractly on one image before anything
    is written: a failing factory, logits of the wrong shape, or features FKD cannot tap are `UserError`s."""
    x = jax.ShapeDtypeStruct((1, source.image_size, source.image_size, 3), jnp.float32)
    uses_hints = any(m.hint_weight for m in config.methods.values())
    for part in ("student", "teacher") if with_teacher else ("student",):
        name = config[part].model
        try:
            model = models.get_model(name, source.num_classes, config.dtype)
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
