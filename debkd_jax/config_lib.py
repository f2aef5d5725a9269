"""Configs: the run config every `configs/*.py` starts from, the `smoke` shrink used by tests and quick
checks,
the one loader of config files, and the validation of a whole config.

Optimizer defaults (the paper gives none): SGD with Nesterov momentum 0.9, weight decay 5e-4 on conv and dense
kernels, one warm-up epoch then cosine decay to 0, peak learning rate 0.05 at batch 64 -- the usual CIFAR
ResNet recipe (mdistiller, torchdistill) scaled linearly to the batch size.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import ml_collections
import numpy as np

from debkd_jax import method_configs
from debkd_jax.errors import UserError

# Training fields added after runs were first recorded: a run's identity holds them only where they differ
# from these defaults (`pipeline.identity.training_fields`), so the runs recorded before are still reused.
LATER_TRAINING_DEFAULTS = dict(nesterov=True, lr_schedule="cosine", lr_decay_epochs=(), lr_decay_rate=0.1)
LR_SCHEDULES = ("cosine", "step")


def train_config(model: str, num_epochs: int, batch_size: int = 64, learning_rate: float = 0.05):
    """How one network (the teacher or the students) trains: SGD with momentum (Nesterov unless `nesterov` is
    False), weight decay on kernels, and `lr_schedule` "cosine" (`warmup_epochs` of linear warm-up, then
    cosine decay to 0) or "step" (`learning_rate` times `lr_decay_rate` at each epoch of
    `lr_decay_epochs`)."""
    return ml_collections.ConfigDict(
        dict(
            model=model,
            num_epochs=num_epochs,
            batch_size=batch_size,
            eval_batch_size=256,
            learning_rate=learning_rate,
            momentum=0.9,
            weight_decay=5e-4,
            warmup_epochs=1.0,
            **LATER_TRAINING_DEFAULTS,
        )
    )


def cluster_config() -> ml_collections.ConfigDict:
    """How the processes of a `distributed=True` job find each other (README, "Multi-device and multi-host").

    JAX detects Cloud TPU, SLURM, Open MPI and Kubernetes jobs: leave the first three fields unset there. Set
    all three where it does not (two processes on one machine, say). Not part of a run's settings.
    """
    return ml_collections.ConfigDict(
        dict(
            coordinator_address="",  # "host:port" where process 0 serves the job's coordination; "" = detect
            num_processes=0,  # 0 = detect
            process_id=-1,  # this process, 0 .. num_processes - 1; -1 = detect
            initialization_timeout=300,  # seconds to wait for the coordinator and every process to join
            # A process silent this long (killed, its host down) is declared dead and the others stop with
            # an error; also the longest wait at exit for the other processes to finish.
            heartbeat_timeout=30,
        )
    )


def base_config(method_names=("KD", "DeBKD")) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.seeds = 1  # students are trained for seeds seed, seed+1, ...; results give mean and std
    config.dtype = "float32"  # compute dtype: "bfloat16" on TPU/GPU
    # How the convs' gradients are computed, same values: "materialized" (conv VJP through a fusion barrier,
    # faster on XLA:CPU), "xla" (plain; right for GPU/TPU), "auto" (materialized when training on CPU). Not
    # part of a run's settings (run.json): changing it resumes and reuses runs as they are.
    config.conv_backward = "auto"
    config.progress = True
    # True: retrain students already in the workdir and replace a teacher trained with other settings; the old
    # folders are renamed <folder>.<time>, never deleted. False: reuse finished work, resume interrupted work,
    # refuse a folder whose settings differ (docs/reliability.md).
    config.overwrite = False
    config.distributed = False  # call jax.distributed.initialize(): several processes (hosts) form one job
    config.cluster = cluster_config()

    config.data = ml_collections.ConfigDict()
    config.data.source = "digits"  # "digits" | "folder:PATH" | "tfds:NAME"
    config.data.cache_dir = "~/.cache/debkd_jax"  # decoded images are cached here; "" disables
    config.data.image_size = 32
    config.data.max_per_class = 0  # 0 = all images; >0 a seeded subset per class
    config.data.digits_classes = 2  # digits: 2 = "0-4" vs "5-9", 10 = ten digits
    config.data.tfds_data_dir = ""
    config.data.use_dataset_test_split = False
    config.data.augment = False  # random crop (pad 4) + flip on device; streamed: random-resized crop + flip
    # "memory": decode the source once into memory (the default, for data that fits); "stream": read it
    # with grain,
    # a batch at a time, per host (docs/scale.md); "auto": stream when the decoded images would not fit
    # comfortably.
    config.data.pipeline = "memory"
    config.data.eval_crop = 224 / 256  # streamed eval: shorter side to image_size / eval_crop, center crop
    config.data.workers = 2  # streamed: grain worker processes decoding and augmenting (0: threads here)
    config.data.logits_chunk_rows = 1024  # streamed: rows per teacher-logits chunk file

    config.teacher = train_config("resnet8x4", num_epochs=6)
    config.teacher.checkpoint = ""  # a finished run's teacher/ folder to reuse instead of training
    # An .npz of the teacher's logits per image id, instead of a teacher network (docs/teachers.md).
    config.teacher.logits = ""
    # The variables (orbax folder or Flax msgpack) of a teacher network teacher.model that is not trained
    # here: a built-in model or any 'package.module:factory' (docs/teachers.md).
    config.teacher.variables = ""
    # K > 1: each training image's teacher logits come from the one of K teachers, each trained on the other
    # K - 1 folds, that did not see it (out-of-fold); val/test logits from the teacher trained on all of them.
    # K + 1 teacher trainings in all (docs/teachers.md).
    config.teacher.folds = 1
    # Streamed: the teacher-logits store's dtype ("float16" and "bfloat16" halve it).
    config.teacher.logits_dtype = "float32"
    config.student = train_config("resnet8", num_epochs=15)

    config.methods = ml_collections.ConfigDict({name: method_configs.preset(name) for name in method_names})
    return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to seconds: tiny models, 2 epochs, a small data slice."""
    config.teacher.model = "resnet_tiny"
    config.student.model = "resnet_tiny"
    for part in (config.teacher, config.student):
        part.num_epochs = 2
        part.batch_size = 32
        part.eval_batch_size = 128
        part.learning_rate = 0.05
    config.data.max_per_class = config.data.max_per_class or 60
    config.progress = False
    return config


def load_config_file(path: str):
    """A config file (`configs/*.py`) as a module, importable from any working folder; `UserError` when it
    cannot be read."""
    if not os.path.isfile(path):
        raise UserError(f"no config file {os.path.abspath(path)}; see configs/ for the configs.")
    name = "debkd_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot load the config file {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config named by `path[:arg]`, as `--config=path[:arg]` names it."""
    path, _, arg = spec.partition(":")
    module = load_config_file(path)
    return module.get_config(arg) if arg else module.get_config()


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
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
        ("data.workers", d.get("workers", 2), lambda v: _is_int(v) and v >= 0, "an int >= 0"),
        (
            "data.logits_chunk_rows",
            d.get("logits_chunk_rows", 1024),
            lambda v: _is_int(v) and v >= 1,
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


def validate_config(config) -> None:
    """Checks the whole config up front, with messages naming the field and the valid values.

    Raises `UserError` (the CLI prints it and exits with status 2). With `config.distributed`, call
    `training.initialize_distributed` first: the batch-size check needs the global device count.
    """
    # Here, not at the top: config files import this module, and a distributed job's launching process loads
    # them without JAX (debkd_jax.supervisor).
    import jax

    from debkd_jax import methods, models

    validate_cluster(config)
    validate_data_fields(config)
    if not config.methods:
        raise UserError("config.methods is empty: name at least one method, e.g. 'DeBKD'.")
    for name, mcfg in config.methods.items():
        try:
            methods.validate(name, mcfg)
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from e
    for part in ("teacher", "student"):
        c = config[part]
        if models.is_factory_spec(c.model):
            try:
                models.load_factory(c.model)
            except UserError as e:
                raise UserError(f"{part}.{e}") from e
        elif c.model not in models.MODELS:
            raise UserError(
                f"{part}.model={c.model!r} is not one of {sorted(models.MODELS)}, nor a Flax module factory "
                "'package.module:factory' (docs/teachers.md)."
            )
        for field in ("num_epochs", "batch_size", "eval_batch_size"):
            if not (_is_int(c[field]) and c[field] >= 1):
                raise UserError(f"{part}.{field}={c[field]!r} must be an integer >= 1.")
        validate_schedule(part, c)
        for field, ok, want in (
            ("learning_rate", lambda v: v > 0, "> 0"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("warmup_epochs", lambda v: v >= 0, ">= 0"),
        ):
            if not (_is_number(c[field]) and ok(c[field])):
                raise UserError(f"{part}.{field}={c[field]!r} must be a finite number {want}.")
        ndev = jax.device_count()
        if c.batch_size % ndev:
            raise UserError(
                f"{part}.batch_size={c.batch_size} is not divisible by the {ndev} devices; "
                f"use a multiple of {ndev}."
            )
    if not isinstance(config.teacher.get("checkpoint", ""), str):
        raise UserError(f"teacher.checkpoint={config.teacher.checkpoint!r} must be a path (a string).")
    validate_teacher_logits(config)
    if not (_is_int(config.seeds) and config.seeds >= 1):
        raise UserError(f"seeds={config.seeds!r} must be an integer >= 1.")
    if not (_is_int(config.seed) and config.seed >= 0):
        raise UserError(f"seed={config.seed!r} must be an integer >= 0.")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={config.dtype!r} is not one of ('float32', 'bfloat16', 'float16').")
    conv_backward = config.get("conv_backward", "auto")
    if conv_backward not in models.CONV_BACKWARD_SETTINGS:
        raise UserError(f"conv_backward={conv_backward!r} is not one of {models.CONV_BACKWARD_SETTINGS}.")
    d = config.data
    if not (isinstance(d.source, str) and d.source):
        raise UserError(f"data.source={d.source!r} must be 'digits', 'folder:PATH' or 'tfds:NAME'.")
    if not (_is_int(d.image_size) and d.image_size >= 1):
        raise UserError(f"data.image_size={d.image_size!r} must be an integer >= 1.")
    if not (_is_int(d.max_per_class) and (d.max_per_class == 0 or d.max_per_class >= 3)):
        raise UserError(
            f"data.max_per_class={d.max_per_class!r} must be 0 (all images) or an integer >= 3 (one image "
            "per class for each of train, val and test)."
        )


def validate_schedule(part: str, c) -> None:
    """`lr_schedule` and the fields only one schedule reads: a field the schedule would ignore is refused."""
    schedule = c.get("lr_schedule", "cosine")
    if schedule not in LR_SCHEDULES:
        raise UserError(f"{part}.lr_schedule={schedule!r} is not one of {LR_SCHEDULES}.")
    if not isinstance(c.get("nesterov", True), bool):
        raise UserError(f"{part}.nesterov={c.nesterov!r} must be True or False.")
    epochs = c.get("lr_decay_epochs", ())
    if not (isinstance(epochs, (tuple, list)) and all(_is_number(e) and e > 0 for e in epochs)):
        raise UserError(
            f"{part}.lr_decay_epochs={epochs!r} must be a tuple of epochs > 0, e.g. (30, 60, 90)."
        )
    rate = c.get("lr_decay_rate", 0.1)
    if not (_is_number(rate) and 0 < rate):
        raise UserError(f"{part}.lr_decay_rate={rate!r} must be a finite number > 0.")
    if schedule == "cosine" and (tuple(epochs) or rate != LATER_TRAINING_DEFAULTS["lr_decay_rate"]):
        raise UserError(
            f"{part}.lr_decay_epochs/lr_decay_rate set a step schedule, but {part}.lr_schedule='cosine' "
            "ignores "
            f"them; set {part}.lr_schedule='step' or leave them at () and 0.1."
        )
    if schedule == "step" and c.warmup_epochs:
        raise UserError(
            f"{part}.warmup_epochs={c.warmup_epochs!r} has no effect with {part}.lr_schedule='step' "
            "(no warm-up); "
            "set it to 0."
        )


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
        if mcfg.online_targets:
            raise UserError(
                f"method {name!r} runs the teacher on every batch (online_targets=True), which "
                f"teacher.logits={path!r} cannot do; set online_targets=False or use a teacher network."
            )


def validate_folds(config, given_teachers: list[str]) -> None:
    """`teacher.folds`: an integer >= 1; K > 1 trains the fold teachers here, so it needs a teacher network
    trained here (or `teacher.checkpoint` for the one trained on all images) and targets built once."""
    folds = config.teacher.get("folds", 1)
    if not (_is_int(folds) and folds >= 1):
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
    for name, mcfg in config.methods.items():
        if mcfg.online_targets:
            raise UserError(
                f"method {name!r} builds targets from the teacher run on every batch (online_targets=True), "
                f"which cannot be out-of-fold; set online_targets=False or teacher.folds=1."
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
    if not (_is_int(cluster.num_processes) and cluster.num_processes >= 0):
        raise UserError(
            f"cluster.num_processes={cluster.num_processes!r} must be an integer >= 1 (0 = detect)."
        )
    if not (_is_int(cluster.process_id) and cluster.process_id >= -1):
        raise UserError(f"cluster.process_id={cluster.process_id!r} must be an integer >= 0 (-1 = detect).")
    if cluster.num_processes and cluster.process_id >= cluster.num_processes:
        raise UserError(
            f"cluster.process_id={cluster.process_id} must be below cluster.num_processes="
            f"{cluster.num_processes} (processes are numbered 0 .. {cluster.num_processes - 1})."
        )
    for field in ("initialization_timeout", "heartbeat_timeout"):
        if not (_is_int(cluster[field]) and cluster[field] >= 1):
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
