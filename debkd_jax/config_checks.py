"""The checks of one concern of a config each, with one-line messages naming the field and its valid values:
the data fields, fields that act on one kind of data only, the targets, the teacher's logits and folds, and
the multi-process cluster. `config_lib.validate_config` runs those that need no data; the pipeline runs
`validate_for_kind` once it knows the kind of data."""

from __future__ import annotations

import math

import numpy as np

from debkd_jax.errors import UserError


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)


def validate_data_fields(config) -> None:
    """`data.pipeline`, `data.eval_crop`, `data.workers`, `data.logits_chunk_rows`, `teacher.logits_dtype`:
    checked before the pipeline is chosen."""
    d = config.data
    checks = [
        (
            "data.pipeline",
            d.get("pipeline", "memory"),
            lambda v: v in ("memory", "stream", "auto"),
            "'memory', 'stream' or 'auto'",
        ),
        (
            "data.eval_crop",
            d.get("eval_crop", 0.875),
            lambda v: isinstance(v, (int, float)) and 0 < v <= 1,
            "a share in (0, 1], e.g. 0.875 (224/256)",
        ),
        ("data.workers", d.get("workers", 2), lambda v: is_int(v) and v >= 0, "an int >= 0"),
        (
            "data.logits_chunk_rows",
            d.get("logits_chunk_rows", 1024),
            lambda v: is_int(v) and v >= 1,
            "an int >= 1",
        ),
        (
            "teacher.logits_dtype",
            config.teacher.get("logits_dtype", "float32"),
            lambda v: v in ("float32", "float16", "bfloat16"),
            "'float32', 'float16' or 'bfloat16'",
        ),
    ]
    for name, value, ok, valid in checks:
        if not ok(value):
            raise UserError(f"{name}={value!r} is not valid; use {valid}.")


# Fields that only one kind of data source reads, with their defaults: set away from the default on the
# other kind, they are refused rather than ignored.
FILES_ONLY_FIELDS = {"data.eval_crop": 224 / 256, "data.workers": 2, "data.logits_chunk_rows": 1024}


def validate_for_kind(config, kind: str) -> None:
    """Fields that act on one kind of data, or one kind of source, only: set elsewhere, a one-line error."""
    d = config.data
    source_kind = str(d.source).partition(":")[0]
    if kind == "memory":
        for name, default in FILES_ONLY_FIELDS.items():
            value = d.get(name.split(".")[1], default)
            if value != default:
                raise UserError(
                    f"{name}={value!r} applies to image files read as they train (data.pipeline='stream'); "
                    f"data.pipeline='memory' decodes every image once: leave it at {default!r} or stream."
                )
    if source_kind != "digits" and d.digits_classes != 2:
        raise UserError(
            f"data.digits_classes={d.digits_classes!r} applies to data.source='digits' only, not "
            f"{d.source!r}: leave it at 2."
        )
    if source_kind != "tfds" and d.tfds_data_dir:
        raise UserError(
            f"data.tfds_data_dir={d.tfds_data_dir!r} applies to 'tfds:NAME' sources only, not {d.source!r}: "
            "leave it empty."
        )


TARGETS = ("fixed", "online", "stored")


def validate_targets(config) -> None:
    """`targets`, `targets_top_k`, `data.views`, `data.mixup`: values, and combinations that cannot act."""
    d, mode = config.data, config.get("targets", "fixed")
    if mode not in TARGETS:
        raise UserError(f"targets={mode!r} is not one of {TARGETS}.")
    top_k, views, mixup = config.get("targets_top_k", 100), d.get("views", 16), d.get("mixup", 0.0)
    if not (is_int(top_k) and top_k >= 1):
        raise UserError(f"targets_top_k={top_k!r} must be an integer >= 1.")
    if not (is_int(views) and views >= 1):
        raise UserError(f"data.views={views!r} must be an integer >= 1.")
    if not (is_number(mixup) and mixup >= 0):
        raise UserError(f"data.mixup={mixup!r} must be a finite number >= 0 (0: no mixup).")
    if not d.augment:
        if mixup:
            raise UserError(
                f"data.mixup={mixup!r} mixes augmented views; set data.augment=True or leave it at 0."
            )
        if views != 16:
            raise UserError(
                f"data.views={views!r} counts augmented views; set data.augment=True or leave it at 16."
            )
    if mode != "stored" and top_k != 100:
        raise UserError(
            f"targets_top_k={top_k!r} applies to targets='stored'; leave it at 100 or store the targets."
        )
    origin = next((f for f in ("logits", "variables", "checkpoint") if config.teacher.get(f, "")), "")
    if mode != "fixed" and origin == "logits":
        raise UserError(
            f"targets={mode!r} needs the teacher network on every view, which teacher.logits (logits of the "
            "images, by id) does not hold; use targets='fixed' or a teacher network."
        )
    if mode != "fixed" and config.teacher.get("folds", 1) > 1:
        raise UserError(
            f"targets={mode!r} takes the targets from the teacher on each view, which cannot be out-of-fold "
            f"(teacher.folds={config.teacher.folds}); use targets='fixed' with folds, or teacher.folds=1."
        )


def validate_teacher_logits(config) -> None:
    """`teacher.logits` / `teacher.variables`: paths, at most one of them and `teacher.checkpoint`; with
    `teacher.logits`, only methods that need nothing but the teacher's logits (not FKD's features, not
    targets from the teacher run on each batch)."""
    variables = config.teacher.get("variables", "")
    if not isinstance(variables, str):
        raise UserError(f"teacher.variables={variables!r} must be a path (a string).")
    path = config.teacher.get("logits", "")
    if not isinstance(path, str):
        raise UserError(f"teacher.logits={path!r} must be a path (a string) to an .npz file.")
    given = [f"teacher.{f}={config.teacher.get(f, '')!r}" for f in ("checkpoint", "logits", "variables")]
    given = [g for g in given if not g.endswith("=''")]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} each name a teacher; keep one of them.")
    validate_folds(config, given)
    if not path:
        return
    for name, mcfg in config.methods.items():
        if mcfg.hint_weight:
            raise UserError(
                f"method {name!r} needs the teacher's features (hint_weight={mcfg.hint_weight}), which "
                f"teacher.logits={path!r} does not hold; drop {name!r} or use a teacher network."
            )


def validate_folds(config, given_teachers: list[str]) -> None:
    """`teacher.folds`: an integer >= 1; K > 1 trains the fold teachers here, so it needs a teacher network
    trained here (or `teacher.checkpoint` for the one trained on all images) and targets built once."""
    folds = config.teacher.get("folds", 1)
    if not (is_int(folds) and folds >= 1):
        raise UserError(
            f"teacher.folds={folds!r} must be an integer >= 1 (1: the teacher's own logits on its training "
            "images; K > 1: out-of-fold logits from K teachers)."
        )
    if folds == 1:
        return
    for given in given_teachers:
        if not given.startswith("teacher.checkpoint="):
            raise UserError(
                f"teacher.folds={folds} trains {folds} fold teachers here, which {given} cannot give; "
                "drop one of them (a logits file can hold out-of-fold logits itself: docs/teachers.md)."
            )


def validate_cluster(config) -> None:
    """Checks `config.cluster` (the multi-process settings), with one message per bad value."""
    cluster = config.get("cluster")
    if cluster is None:
        return
    address = cluster.coordinator_address
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not isinstance(address, str) or (address and not (host and port.isdigit() and 0 < int(port) < 65536)):
        raise UserError(
            f"cluster.coordinator_address={address!r} must be 'host:port' (say 'localhost:12355' or "
            "'10.0.0.1:12355', process 0's host) or '' to let JAX detect it."
        )
    if not (is_int(cluster.num_processes) and cluster.num_processes >= 0):
        raise UserError(
            f"cluster.num_processes={cluster.num_processes!r} must be an integer >= 1 (0 = detect)."
        )
    if not (is_int(cluster.process_id) and cluster.process_id >= -1):
        raise UserError(f"cluster.process_id={cluster.process_id!r} must be an integer >= 0 (-1 = detect).")
    if cluster.num_processes and cluster.process_id >= cluster.num_processes:
        raise UserError(
            f"cluster.process_id={cluster.process_id} must be below cluster.num_processes="
            f"{cluster.num_processes} (processes are numbered 0 .. {cluster.num_processes - 1})."
        )
    for field in ("initialization_timeout", "heartbeat_timeout"):
        if not (is_int(cluster[field]) and cluster[field] >= 1):
            raise UserError(f"cluster.{field}={cluster[field]!r} must be a whole number of seconds >= 1.")
    given = [
        f
        for f, unset in (
            ("coordinator_address", ""),
            ("num_processes", 0),
            ("process_id", -1),
            ("initialization_timeout", 300),
            ("heartbeat_timeout", 30),
        )
        if cluster[f] != unset
    ]
    if given and not config.distributed:
        raise UserError(
            f"cluster.{given[0]} is set but distributed=False: add --config.distributed=True to run as one "
            "process of a multi-process job."
        )
